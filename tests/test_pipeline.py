"""Rejection sampling on crafted completions, and the multi-stage pipeline: stage configs,
resuming at the interrupted stage, the summary table."""

import json
from pathlib import Path

import pytest
import yaml

from esft.commands import pipeline
from esft.evaluation import Rollout
from esft.commands.pipeline import fit_config, load_pipeline, run_pipeline
from esft.runconfig import ConfigError

from conftest import TINY, hold_lock

ROOT = Path(__file__).parents[1]


def test_rejection_sample_keeps_correct_formatted_distinct_capped(monkeypatch):
    from esft.commands import rejection_sample as rejection

    records = [{"task": "arithmetic", "answer": "<think>2+3=5</think>\n5", "id": "a",
                "messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "x"}]},
               {"task": "arithmetic", "answer": "7", "id": "b", "messages": [{"role": "user", "content": "What is 3 + 4?"}]}]
    # a: right, the same up to whitespace, right without the format, wrong;
    # b: wrong, right, right (over the cap of 1), cut off
    texts = ["<think>2+3=5</think>\n5", "<think>2+3=5</think>  5", "5", "<think>2+3=6</think>\n6",
             "<think>x</think>\n5", "<think>3+4=7</think>\n7", "<think>3+4</think>\n7", "<think>3+4=7"]
    truncated = [False] * 7 + [True]

    def fake_rollout(model, tokenizer, conversations, max_new_tokens, batch_size, k, progress, **sampling):
        assert [c[-1]["role"] for c in conversations] == ["user", "user"] and k == 4
        return [Rollout([1], [2] * (i + 1), t, tr) for i, (t, tr) in enumerate(zip(texts, truncated))]

    monkeypatch.setattr(rejection, "rollout", fake_rollout)
    rows, stats = rejection.rejection_sample(None, None, records, k=4, max_per_prompt=1, temperature=1.0)
    assert [r["messages"][-1]["content"] for r in rows] == ["<think>2+3=5</think>\n5", "<think>3+4=7</think>\n7"]
    assert rows[0]["messages"][0]["content"] == "What is 2 + 3?" and len(rows[0]["messages"]) == 2
    assert rows[0]["task"] == "arithmetic" and rows[0]["id"] == "a-rs1"
    assert stats["correct"] == 5 and stats["truncated"] == 1 and stats["formatted"] == 6
    assert stats["duplicates"] == 1 and stats["over_cap"] == 1 and stats["kept"] == 2 and stats["prompt_coverage"] == 1.0
    rows2, stats2 = rejection.rejection_sample(None, None, records, k=4, max_per_prompt=3, require_format=False)
    assert len(rows2) == 4 and stats2["duplicates"] == 1  # a: the first and the plain "5"; b: two


def test_load_pipeline_errors(tmp_path):
    bad = {"stages": [{"name": "a", "fit": "x.yaml"}, {"name": "b", "fit": "x.yaml", "init_from": "c"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="stage 'b'.*init_from='c'"):
        load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "a", "fit": "x", "rejection_sample": {}}]}))
    with pytest.raises(ConfigError, match="exactly one"):
        load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [
        {"name": "a", "fit": "x"}, {"name": "b", "fit": "x", "data_from": "a", "data_mode": "mix"}]}))
    with pytest.raises(ConfigError, match="stage 'b': data_mode must be 'replace' or 'add'"):
        load_pipeline(tmp_path / "p.yaml")
    assert [s["name"] for s in load_pipeline(ROOT / "configs/pipelines/r1_tiny.yaml")["stages"]] == [
        "cold_start", "rl", "rejection_sampling", "rs_sft", "rl2"]


def test_stage_fit_configs_of_r1_tiny_parse(tmp_path, capsys):
    from esft.cli import main

    cfg = load_pipeline(ROOT / "configs/pipelines/r1_tiny.yaml")
    cfg["stages"][0]["overrides"] = {**(cfg["stages"][0].get("overrides") or {}), "data.init_args.seed": "{seed}"}
    for stage in cfg["stages"]:
        if "fit" not in stage:
            continue
        fc = fit_config(yaml.safe_load((ROOT / stage["fit"]).read_text()), stage, tmp_path / stage["name"], 3)
        path = tmp_path / f"{stage['name']}.yaml"
        path.write_text(yaml.safe_dump(fc))
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(path), "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["seed_everything"] == 3 and printed["trainer"]["default_root_dir"] == str(tmp_path / stage["name"])
        if stage["name"] == "cold_start":  # "{seed}" in an override: the pipeline's seed
            assert printed["data"]["init_args"]["seed"] == 3
        if stage.get("init_from"):
            assert printed["model"]["init_args"]["model_name_or_path"] == str(tmp_path / stage["init_from"] / "hf")
        if stage.get("data_from"):  # r1_tiny's rs_sft adds the samples to the cold-start data
            assert stage["data_mode"] == "add" and printed["data"]["init_args"]["path"] == "builtin"
            assert printed["data"]["init_args"]["extra_paths"] == [str(tmp_path / stage["data_from"] / "data.jsonl")]


def tiny_sft(path: Path) -> Path:
    cfg = {"trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False,
                       "limit_val_batches": 0,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "x"}},
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": "elsewhere", "save_last": True}}]},
           "model": {"class_path": "esft.objectives.SFTModule",
                     "init_args": {"model_config": TINY["llama"], "tokenizer": "builtin", "optim": {"lr": 1e-2}}},
           "data": {"class_path": "esft.data.SFTDataModule",
                    "init_args": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}],
                                  "num_train_per_task": 32, "num_val_per_task": 0, "max_length": 64, "max_tokens": 256}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_grpo(path: Path) -> Path:
    cfg = {"trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "enable_progress_bar": False,
                       "limit_val_batches": 0, "enable_checkpointing": False, "logger": False},
           "model": {"class_path": "esft.objectives.GRPOModule",
                     "init_args": {"num_generations": 2, "max_completion_length": 8, "optim": {"lr": 1e-3}}},
           "data": {"class_path": "esft.data.PromptDataModule",
                    "init_args": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}],
                                  "num_train_per_task": 8, "num_val_per_task": 0, "batch_size": 2}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def in_process(argv, log):
    """The stage commands run in this process (the subprocess path is covered by the slow test)."""
    from esft.cli import main
    from esft.commands.rejection_sample import main as rejection_main

    log.open("a").write(f"$ {' '.join(argv)}\n")
    if argv[0] == "fit":
        main(argv)
    else:
        rejection_main(argv[1:])


def test_pipeline_resumes_at_interrupted_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run", in_process)
    sft, grpo = tiny_sft(tmp_path / "sft.yaml"), tiny_grpo(tmp_path / "grpo.yaml")
    stages = [{"name": "sft", "fit": str(sft)},
              {"name": "rs", "model_from": "sft",
               "rejection_sample": {"task": {"name": "arithmetic", "max_digits": 1, "think": True}, "num_prompts": 3,
                                    "k": 2, "max_new_tokens": 6}},
              {"name": "rl", "fit": str(grpo), "init_from": "sft", "overrides": {"model.init_args.loss_type": "bogus"}}]
    cfg = {"out": str(tmp_path / "run"), "seed": 1, "stages": stages,
           "eval": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}], "num_examples": 4, "max_new_tokens": 6}}
    with pytest.raises(SystemExit):  # the bad override stops the third stage
        run_pipeline(cfg)
    run = tmp_path / "run"
    assert (run / "sft" / "done.json").exists() and (run / "rs" / "done.json").exists() and not (run / "rl" / "done.json").exists()
    # every output moves into the stage dir (`esft.runconfig.run_config`): a path outside the base's run dirs by its name
    assert (run / "sft" / "hf" / "model.safetensors").exists() and (run / "sft" / "elsewhere" / "last.ckpt").exists()
    assert (run / "rs" / "data.jsonl").exists() and json.loads((run / "rs" / "data.jsonl.stats.json").read_text())["samples"] == 6
    sft_log = (run / "sft" / "stage.log").read_text()
    stages[2]["overrides"] = {"model.init_args.loss_type": "dapo"}
    table = run_pipeline(cfg)
    assert (run / "sft" / "stage.log").read_text() == sft_log  # finished stages are not rerun
    assert (run / "rl" / "done.json").exists() and (run / "rl" / "hf" / "model.safetensors").exists()
    stage_cfg = yaml.safe_load((run / "rl" / "run.yaml").read_text())
    assert stage_cfg["model"]["init_args"]["model_name_or_path"] == str(run / "sft" / "hf")
    lines = table.splitlines()
    assert lines[0].startswith("| stage | kind | step | pass@1 | format") and len(lines) == 5
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == ["sft", "rs", "rl"]
    result = json.loads((run / "rl" / "done.json").read_text())
    assert 0.0 <= result["pass@1"] <= 1.0 and 0.0 <= result["format"] <= 1.0 and result["n"] == 4
    assert result["step"] == 2 and "step" not in json.loads((run / "rs" / "done.json").read_text())  # the exported weights' step
    assert (run / "summary.csv").read_text().splitlines()[0] == "stage,kind,step,pass@1,format,length,pref_accuracy,kept,wall_s"


@pytest.mark.slow
def test_pipeline_cli_runs_stages_in_subprocesses(tmp_path):
    from esft.cli import PROJECT_COMMANDS

    assert PROJECT_COMMANDS["pipeline"][0] == "esft.commands.pipeline"
    cfg = {"out": str(tmp_path / "run"), "stages": [{"name": "sft", "fit": str(tiny_sft(tmp_path / "sft.yaml"))}],
           "eval": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}], "num_examples": 4, "max_new_tokens": 6}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    table = pipeline.main(["--config", str(tmp_path / "p.yaml")])
    assert "| sft | fit |" in table and (tmp_path / "run" / "sft" / "done.json").exists()


@pytest.mark.parametrize("names, index, bad", [
    (["a", "../../x"], 1, "../../x"),
    (["/tmp/abs"], 0, "/tmp/abs"),
    (["a", ""], 1, ""),
    (["a", "."], 1, "."),
    (["a", "b/c"], 1, "b/c"),
    (["a", 7], 1, 7),
    (["a", "b", "a"], 2, "a"),
])
def test_stage_names_are_single_safe_path_components(tmp_path, monkeypatch, names, index, bad):
    stages = [{"name": n, "fit": "x.yaml"} for n in names]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError) as e:
        load_pipeline(tmp_path / "p.yaml")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'p.yaml'}: stage {index}: ") and repr(bad) in message and "\n" not in message
    # a config given as a mapping is checked too, before anything is written
    monkeypatch.setattr(pipeline, "_run", lambda argv, log: pytest.fail("a stage ran"))
    with pytest.raises(ConfigError, match=f"stage {index}: "):
        run_pipeline({"stages": stages}, out=tmp_path / "a" / "b" / "out")
    assert not (tmp_path / "a").exists() and not (tmp_path / "x").exists()


def test_pipeline_refuses_an_out_dir_another_process_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "_run", lambda argv, log: pytest.fail("a stage ran"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "a", "fit": "x.yaml"}]}))
    with hold_lock(tmp_path / "out") as pid:
        with pytest.raises(SystemExit) as e:
            pipeline.main(["--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft pipeline: error: ") and "\n" not in err
    assert str(tmp_path / "out") in err and f"pid {pid}" in err and not (tmp_path / "out" / "a").exists()


def test_a_bad_pipeline_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "../a", "fit": "x.yaml"}]}))
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "a").exists()
    assert capsys.readouterr().err.strip() == (f"esft pipeline: error: {tmp_path / 'p.yaml'}: stage 0: name '../a' "
                                               "is not a safe directory name (letters, digits and ._=,+- only, "
                                               "not starting or ending with . or -, at most 120 characters)")


def test_a_restart_refuses_a_stage_dir_an_earlier_stage_process_still_writes(tmp_path, monkeypatch):
    import subprocess
    import sys

    from esft.runs import RunDirBusy

    monkeypatch.setattr(pipeline, "_run", lambda argv, log: pytest.fail("a stage ran"))
    cfg = {"stages": [{"name": "sft", "fit": str(tiny_sft(tmp_path / "sft.yaml"))}]}
    stage = tmp_path / "out" / "sft"
    stage.mkdir(parents=True)
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the killed pipeline's stage
    try:
        (stage / "RUNNING").write_text(f"{left.pid}\n")
        with pytest.raises(RunDirBusy, match=f"{stage} is still being written by pid {left.pid}"):
            run_pipeline(cfg, out=tmp_path / "out")
    finally:
        left.kill()
        left.wait()
    monkeypatch.setattr(pipeline, "_run", lambda argv, log: (_ for _ in ()).throw(RuntimeError("ran")))
    with pytest.raises(RuntimeError, match="ran"):  # once it has ended, the stage runs again
        run_pipeline(cfg, out=tmp_path / "out")


def test_r1_preference_tiny_stage_configs_parse(tmp_path, capsys):
    """Every fit and preference stage of the preference pipeline gives a config `esft fit` accepts,
    and `reward_from` points GRPO's model reward at the reward-model stage's export."""
    from esft.cli import main

    cfg = load_pipeline(ROOT / "configs/pipelines/r1_preference_tiny.yaml")
    kinds = []
    for stage in cfg["stages"]:
        kind = "fit" if "fit" in stage else "preference"
        kinds.append(kind)
        fc = fit_config(yaml.safe_load((ROOT / stage[kind]).read_text()), stage, tmp_path / stage["name"], 0)
        path = tmp_path / f"{stage['name']}.yaml"
        path.write_text(yaml.safe_dump(fc))
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(path), "--print_config"])
        model = yaml.safe_load(capsys.readouterr().out)["model"]
        assert (kind == "preference") == (model["class_path"] in pipeline.PREFERENCE_MODULES)
        if stage.get("reward_from"):
            assert model["init_args"]["reward_options"]["model"]["path"] == str(tmp_path / stage["reward_from"] / "hf")
            assert model["init_args"]["rewards"]["model"] == 0.5
    assert kinds == ["fit", "preference", "fit", "preference"]
    stage = {"name": "rl", "fit": "x", "reward_from": "rm"}  # no model weight: a clear error
    with pytest.raises(ConfigError, match="stage 'rl': reward_from='rm' needs a 'model' weight"):
        fit_config({"model": {"init_args": {"rewards": {"accuracy": 1.0}}}}, stage, tmp_path / "rl", 0)


def preference_pipeline(tmp_path, monkeypatch, kind: str):
    """Run SFT -> a preference stage (``dpo`` or ``rm``) in process; returns the run directory and
    the stage's result, after checking that the stage started from the SFT export and that its
    held-out preference accuracy (computed from the export) is the one its run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_preference import dpo_config
    from test_reward_model import reward_config

    monkeypatch.setattr(pipeline, "_run", in_process)
    (tmp_path / "data").mkdir()
    config = dpo_config(tmp_path / "data", steps=6) if kind == "dpo" else reward_config(tmp_path / "data", 5, export=False)
    stages = [{"name": "sft", "fit": str(tiny_sft(tmp_path / "sft.yaml"))},
              {"name": kind, "preference": str(config), "init_from": "sft"}]
    cfg = {"out": str(tmp_path / "run"), "stages": stages,
           "eval": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}], "num_examples": 4, "max_new_tokens": 6}}
    table = run_pipeline(cfg)
    run = tmp_path / "run"
    stage_cfg = yaml.safe_load((run / kind / "run.yaml").read_text())
    assert stage_cfg["model"]["init_args"]["model_name_or_path"] == str(run / "sft" / "hf")
    result = json.loads((run / kind / "done.json").read_text())
    logged = EventAccumulator(str(run / kind)).Reload().Scalars("val/accuracy")[-1].value
    assert result["kind"] == "preference" and result["pref_accuracy"] == pytest.approx(logged) and logged >= 0.9
    assert f"| {kind} | preference |" in table and "pref_accuracy" in table.splitlines()[0]
    return run, result, cfg


@pytest.mark.slow  # 16 to 56 s on the loaded 2-core machine (load average 8 to 13)
def test_sft_then_dpo_pipeline(tmp_path, monkeypatch):
    run, result, cfg = preference_pipeline(tmp_path, monkeypatch, "dpo")
    assert 0.0 <= result["pass@1"] <= 1.0  # a policy: evaluated by generation too


@pytest.mark.slow  # 9 to 35 s on the loaded 2-core machine (load average 11 to 13)
def test_sft_then_reward_model_pipeline(tmp_path, monkeypatch):
    run, result, _ = preference_pipeline(tmp_path, monkeypatch, "rm")
    assert "pass@1" not in result  # a reward model does not generate
    assert json.loads((run / "rm" / "hf" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_a_preference_stage_needs_a_preference_config(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run", lambda argv, log: pytest.fail("a stage ran"))
    bad = {"name": "bad", "preference": str(tiny_sft(tmp_path / "sft.yaml"))}
    with pytest.raises(ConfigError, match="stage 'bad': a preference stage trains one of .*SFTModule"):
        run_pipeline({"stages": [bad]}, out=tmp_path / "run")
