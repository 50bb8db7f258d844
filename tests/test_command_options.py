"""Options files and --print_config of the project commands (`esft.commands.options`): a command
run from an options file is the command run with the same flags."""

import importlib
import json

import pytest
import yaml

from esft.commands.options import FILE_DEST

# (command module, the options-file flag, the flags of a run); a subcommand is the first word
RUNS = [
    ("eval", "--config", ["--model", "m", "--tasks", "reverse_words", "arithmetic", "--k", "1", "4", "--num-samples", "4",
                          "--temperature", "0.7", "--dtype", "bfloat16"]),
    ("bench", "--config", ["--layout", "rows", "padded", "--no-trl", "--steps", "3", "--gradient-checkpointing",
                           "--device", "cpu"]),
    ("curate", "--options", ["--input", "builtin", "--config", "stages.yaml", "--out", "o", "--tasks", "arithmetic",
                             "--n", "5", "--on-bad-record", "skip"]),
    ("experts", "--config", ["score", "--model", "m", "--tasks", "arithmetic", "--tokens", "300", "--out", "s"]),
    ("experts", "--config", ["select", "--scores", "s.json", "--method", "gate", "--relative", "--out", "e.json"]),
    ("experts", "--config", ["save", "--ckpt", "last.ckpt", "--layout", "deepseek", "--out", "a"]),
    ("experts", "--config", ["merge", "--base", "b", "--adapter", "a", "--out", "m"]),
    ("export", "--config", ["--tasks", "arithmetic", "sort_words", "--n", "3", "--kwargs", '{"think": true}']),
    ("distill_data", "--options", ["responses", "--teacher", "t", "--tasks", '{"name": "arithmetic", "max_digits": 2}',
                                   "sort_words", "--k", "2", "--sample", "--out", "r.jsonl"]),
    ("distill_data", "--options", ["topk", "--teacher", "t", "--config", "fit.yaml", "--k", "8", "--out", "c"]),
    ("rejection_sample", "--config", ["--model", "m", "--task", "arithmetic", "--task", '{"name": "sort_words"}',
                                      "--no-format", "--out", "rs.jsonl"]),
    ("train_tokenizer", "--config", ["--out", "tok", "--vocab-size", "512"]),
    ("sweep", "--options", ["--config", "base.yaml", "--grid", "grid.yaml", "--seeds", "0", "1", "--metrics", "val/*",
                            "--max-cells", "2"]),
    ("tune", "--options", ["--config", "base.yaml", "--space", "space.yaml", "--n-trials", "3", "--timeout", "60"]),
    ("pipeline", "--options", ["--config", "p.yaml", "--out", "o", "--seed", "2"]),
]


def parse(module: str, argv: list[str]) -> dict:
    """The options `esft <module> argv` runs with."""
    args = vars(importlib.import_module(f"esft.commands.{module}").parse_args(argv))
    return {k: v for k, v in args.items() if k not in (FILE_DEST, "print_config")}


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the subcommand, if any; the flags)."""
    return (argv[:1], argv[1:]) if not argv[0].startswith("-") else ([], argv)


def printed_config(module: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(module, [*argv, "--print_config"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module, flag, argv", RUNS, ids=[f"{m}-{a[0]}" if not a[0].startswith("-") else m for m, _, a in RUNS])
def test_print_config_fed_back_as_the_options_file_gives_the_same_options(tmp_path, capsys, module, flag, argv):
    text = printed_config(module, argv, capsys)
    path = tmp_path / "options.yaml"
    path.write_text(text)
    sub, _ = split(argv)
    assert parse(module, [*sub, flag, str(path)]) == parse(module, argv)
    assert printed_config(module, [*sub, flag, str(path)], capsys) == text


def test_flags_beside_the_options_file_win_wherever_they_stand(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("model: from-file\nnum_examples: 5\ntasks: [arithmetic]\n")
    assert parse("eval", ["--config", str(path)])["num_examples"] == 5
    for argv in (["--num-examples", "7", "--config", str(path)], ["--config", str(path), "--num-examples", "7"]):
        args = parse("eval", argv)
        assert (args["num_examples"], args["model"], args["tasks"]) == (7, "from-file", ["arithmetic"])


def test_a_hand_written_options_file_is_read_like_flags(tmp_path):
    """Strings go through the option's type, one value becomes a list where the flag takes
    several, and a name may be written with dashes as on the command line."""
    path = tmp_path / "eval.yaml"
    path.write_text("model: m\ntasks: reverse_words\nk: 2\nnum_examples: '7'\nmax-new-tokens: 9\nnum_samples: 2\n")
    assert parse("eval", ["--config", str(path)]) == parse(
        "eval", ["--model", "m", "--tasks", "reverse_words", "--k", "2", "--num-examples", "7", "--max-new-tokens", "9",
                 "--num-samples", "2"])
    path = tmp_path / "responses.yaml"
    path.write_text('teacher: t\nout: r.jsonl\ntasks: [\'{"name": "arithmetic", "max_digits": 2}\', sort_words]\n')
    args = parse("distill_data", ["responses", "--options", str(path)])
    assert args["tasks"] == [{"name": "arithmetic", "max_digits": 2}, "sort_words"]


@pytest.mark.parametrize("text, message", [
    ("model: m\ntasks: [arithmetic]\nnum_exampels: 5\n", "unknown option 'num_exampels'; the options of esft eval are: model, "),
    ("model: m\ntasks: [arithmetic]\nsplit: test\n", "option 'split': 'test' is not one of train, heldout"),
    ("model: m\ntasks: [arithmetic]\nseed: one\n", "option 'seed': invalid value 'one'"),
    ("- model\n", "an options file is a mapping of option names to values"),
], ids=["unknown", "choice", "type", "not-a-mapping"])
def test_a_bad_options_file_is_an_error_naming_the_file_and_the_key(tmp_path, capsys, text, message):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse("eval", ["--config", str(path)])
    assert e.value.code == 2
    assert f"esft eval: error: {path}: {message}" in capsys.readouterr().err


def test_a_command_run_from_an_options_file_writes_what_the_flags_write(tmp_path, monkeypatch):
    from esft.commands.export import main

    monkeypatch.chdir(tmp_path)  # an options file that went unread would write to the default --out, data/
    flags = ["--tasks", "arithmetic", "--n", "4", "--seed", "3", "--format", "alpaca", "--kwargs", '{"max_digits": 2}']
    main([*flags, "--out", str(tmp_path / "flags")])
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(
        {"tasks": ["arithmetic"], "n": 4, "seed": 3, "format": "alpaca", "kwargs": {"max_digits": 2},
         "out": str(tmp_path / "file")}))
    main(["--config", str(tmp_path / "export.yaml")])
    written = sorted(p.name for p in (tmp_path / "flags").iterdir())
    assert written == ["arithmetic.train.jsonl"]
    for name in written:
        rows = [json.loads(line) for line in (tmp_path / "file" / name).read_text().splitlines()]
        assert len(rows) == 4 and {"instruction", "input", "output"} <= set(rows[0])
        assert (tmp_path / "file" / name).read_text() == (tmp_path / "flags" / name).read_text()


def test_help_shows_the_required_options_as_required(capsys):
    with pytest.raises(SystemExit) as e:
        parse("eval", ["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert "--model MODEL" in usage and "[--model MODEL]" not in usage and "--config FILE" in usage
