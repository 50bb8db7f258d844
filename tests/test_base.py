"""`esft base`: a base is built once through the pipeline, keyed by the content of its configs,
reused without training, finished after an interruption, and refused when its data holds a
task it names specialised."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esft.commands import base, pipeline
from esft.commands.base import base_dir, load_base
from esft.runconfig import ConfigError

from conftest import hold_lock
from test_pipeline import in_process

TINY = Path(__file__).parent / "configs" / "base_tiny.yaml"
ROOT = Path(__file__).parents[1]


def copy_tiny(dst: Path) -> Path:
    """The tiny base's three config files, copied into `dst`; returns the base config's path."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in TINY.parent.glob("base_tiny*.yaml"):
        shutil.copy(path, dst / path.name)
    return dst / TINY.name


def mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_base_is_built_once_then_reused_and_loads(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from esft.evaluation import perplexity
    from esft.data.tasks import build_task
    from esft.models import load_tokenizer
    from esft.objectives.loading import load_model

    monkeypatch.setattr(pipeline, "_run", in_process)  # the stages' own processes: tests/test_pipeline.py
    out = tmp_path / "bases"
    hf = base.main(["--config", str(TINY), "--out", str(out)])
    printed = capsys.readouterr().out
    d = hf.parent
    assert d.parent == out and d.name.startswith("base_tiny-") and printed.splitlines()[-1] == str(hf)
    assert "base_tiny: built" in printed and (d / "stages" / "chat" / "done.json").exists()
    record = json.loads((d / "base.json").read_text())
    assert record["model_name_or_path"] == str(hf) and record["seed"] == 0
    assert set(record["heldout_loss"]) == {"text", "chat"}
    assert set(record["heldout_loss"]["text"]) == {"general", "reverse_words", "mean"}
    assert set(record["scores"]) == {"general", "reverse_words"} and set(record["specialised_scores"]) == {"sort_words"}
    assert all(0.0 <= v <= 1.0 for v in [*record["scores"].values(), *record["specialised_scores"].values()])
    check = record["decontamination"]
    assert check["stages"] == {"text": {"checked": 128, "flagged": 0}, "chat": {"checked": 64, "flagged": 0}}
    assert check["tasks"] == ["sort_words"] and check["options"]["ngram"] == 5 and 0 < check["vocabulary"]["tokens_seen"]

    model = AutoModelForCausalLM.from_pretrained(hf)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    # the text stage's held-out loss is the final model's loss on plain text, every token trained
    text = yaml.safe_load((TINY.parent / "base_tiny_text.yaml").read_text())["data"]["init_args"]
    tok = load_tokenizer(str(hf))
    tok.chat_template = text["chat_template"]
    records = build_task("general").generate(4, 0, "heldout")
    loss = perplexity(load_model(str(hf), model.device, "float32")[0], tok, records, 64, 256, "all")["loss"]
    assert record["heldout_loss"]["text"]["general"] == pytest.approx(loss, rel=1e-5)
    assert record["heldout_loss"]["chat"]["general"] != pytest.approx(loss, rel=1e-3)

    before = mtimes(d)
    assert base.main(["--config", str(TINY), "--out", str(out)]) == hf
    printed = capsys.readouterr().out
    assert "reused" in printed and "nothing trained" in printed and "[pipeline]" not in printed
    assert mtimes(d) == before  # nothing retrained, nothing rewritten

    (d / "base.json").unlink()  # stopped after the stages, before the record: finished, not retrained
    shutil.rmtree(hf)
    assert base.main(["--config", str(TINY), "--out", str(out)]) == hf
    printed = capsys.readouterr().out
    assert "text: done, skipped" in printed and "chat: done, skipped" in printed and "built" in printed
    assert json.loads((d / "base.json").read_text())["heldout_loss"] == record["heldout_loss"]
    assert (hf / "model.safetensors").read_bytes() == (d / "stages" / "chat" / "hf" / "model.safetensors").read_bytes()


def test_the_key_is_the_content_of_every_config_file_and_the_seed(tmp_path, monkeypatch):
    monkeypatch.delenv("ESFT_BASE_CACHE", raising=False)
    here = base_dir(TINY, tmp_path)
    assert here.parent == tmp_path and here.name.startswith("base_tiny-")
    moved = copy_tiny(tmp_path / "elsewhere")
    assert base_dir(moved, tmp_path) == here  # same content, another path
    stage = moved.parent / "base_tiny_chat.yaml"
    stage.write_text("# another comment\n" + stage.read_text())
    assert base_dir(moved, tmp_path) == here  # comments do not count
    stage.write_text(stage.read_text().replace("max_steps: 2", "max_steps: 3"))
    assert base_dir(moved, tmp_path) != here  # a stage config's content does
    assert base_dir(TINY, tmp_path, seed=1) != here
    cfg = yaml.safe_load(TINY.read_text())
    cfg["report"]["num_examples"] = 5
    changed = tmp_path / "elsewhere" / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    assert base_dir(changed, tmp_path).name.startswith("base_tiny-") and base_dir(changed, tmp_path) != here
    del cfg["name"]
    changed.write_text(yaml.safe_dump(cfg))
    assert base_dir(changed, tmp_path).name.startswith("changed-")  # the name defaults to the file's stem
    monkeypatch.setenv("ESFT_BASE_CACHE", str(tmp_path / "cache"))
    assert base_dir(TINY).parent == tmp_path / "cache"


def write_base(tmp_path: Path, **changes) -> Path:
    """The tiny base config in `tmp_path`, with top-level `changes` (None removes a key)."""
    path = copy_tiny(tmp_path / "cfg")
    cfg = yaml.safe_load(path.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def test_a_specialised_task_in_the_data_stops_the_build_before_training(tmp_path, capsys):
    from esft.data.tasks import build_task

    out = tmp_path / "bases"
    path = write_base(tmp_path, specialised=["reverse_words"])  # a task the stages train on
    with pytest.raises(SystemExit) as e:
        base.main(["--config", str(path), "--out", str(out)])
    assert e.value.code == 2
    assert "stage 'text' trains on reverse_words, which the base config names specialised" in capsys.readouterr().err
    assert not list(out.glob("*/stages"))

    # records of the held-out problems in a stage's data: the decontamination filter flags them
    heldout = build_task("sort_words").generate(3, 0, "heldout")
    (tmp_path / "leak.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    path = write_base(tmp_path, specialised=["sort_words"], decontaminate={"ngram": 5, "field": "prompt"})
    stage = tmp_path / "cfg" / "base_tiny_chat.yaml"
    stage.write_text(stage.read_text().replace("seed: 1", f"seed: 1\n    extra_paths: [{tmp_path / 'leak.jsonl'}]"))
    with pytest.raises(ConfigError, match=r"3 of 195 training records share a word 5-gram \(prompt\) with held-out "
                                              r"problems of sort_words \(e.g. chat: sort_words-heldout-0-0"):
        base.build_base(path, out)


def test_two_builds_of_one_base_do_not_share_its_directory(tmp_path, capsys):
    d = base_dir(TINY, tmp_path)
    with hold_lock(d) as pid:
        with pytest.raises(SystemExit) as e:
            base.main(["--config", str(TINY), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert f"in use by another run (pid {pid}" in capsys.readouterr().err
    assert not (d / "stages").exists()


@pytest.mark.parametrize("changes, message", [
    ({"out": "runs/x"}, "has no 'out'"),
    ({"name": "../x"}, "not a safe directory name"),
    ({"stages": [{"name": "text", "fit": "missing.yaml"}]}, r"no config file .*cfg/missing.yaml \(stage configs are relative"),
    ({"stages": [{"name": "a/b", "fit": "base_tiny_text.yaml"}]}, "stage 0: name 'a/b' is not a safe directory name"),
    ({"stages": [{"name": "text", "fit": "base_tiny_text.yaml"}, {"name": "rs", "rejection_sample": {}, "model_from": "text"}]},
     "stage 'rs': a base is built from fit stages"),
    ({"stages": [{"name": "text", "fit": "base_tiny_text.yaml", "overrides": {"data.init_args.curation.x": 1}}]},
     "data options are overridden one data.init_args.<name> at a time"),
])
def test_bad_base_configs_are_one_line_errors(tmp_path, capsys, changes, message):
    with pytest.raises(SystemExit) as e:
        base.main(["--config", str(write_base(tmp_path, **changes)), "--out", str(tmp_path / "bases")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("esft base: error: ") and len(err.strip().splitlines()) == 1 and re.search(message, err)


def test_the_repository_base_configs_keep_the_studies_tasks_out():
    for name in ("dense", "moe"):
        cfg = load_base(ROOT / "configs" / "base" / f"{name}.yaml")
        assert [s["name"] for s in cfg["stages"]] == ["text", "chat"] and cfg["name"] == name
        assert "intent_json" in cfg["specialised"]
        inlined = base.inline_stages(cfg)
        text, chat = (base.stage_data(s) for s in inlined["stages"])
        assert text["train_on"] == "all" and text["chat_template"] and text["tasks"] == [*chat["tasks"], "lexicon"]
        assert chat["train_on"] == "assistant" and chat["chat_template"] is None
        names = {base.build_task(t).name for t in cfg["specialised"]}
        assert not names & {base.build_task(t).name for t in text["tasks"]}


@pytest.mark.slow
def test_esft_base_runs_its_stages_in_subprocesses(tmp_path):
    from esft.cli import PROJECT_COMMANDS

    assert PROJECT_COMMANDS["base"][0] == "esft.commands.base"
    argv = [sys.executable, "-m", "esft.cli", "base", "--config", str(TINY), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    hf = Path(first.stdout.splitlines()[-1])
    assert (hf / "model.safetensors").exists() and (hf.parent / "stages" / "text" / "stage.log").exists()
    second = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    assert "reused" in second.stdout and second.stdout.splitlines()[-1] == str(hf)
