"""experiments/esft_paper/run.py on a given base: where it writes, and the grids it hands to `esft sweep`."""

import importlib.util
import sys
from pathlib import Path

import pytest

from esft.commands.sweep import load_grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_mod():
    spec = importlib.util.spec_from_file_location("esft_paper_run", REPO / "experiments/esft_paper/run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_given_base_is_named_after_its_directory_and_kept_apart(study_mod, tmp_path):
    hf = tmp_path / "moe-abc123" / "hf"
    hf.mkdir(parents=True)
    with pytest.raises(SystemExit, match="no model.safetensors in .*moe-abc123/hf"):
        study_mod.Study.given(hf)
    (hf / "model.safetensors").write_bytes(b"")
    study = study_mod.Study.given(hf)
    own = study_mod.Study.own()
    assert (study.base, study.own_base) == (hf, False)
    assert study.runs.name == "esft_paper_moe-abc123" and study.results.name == "results_moe-abc123"
    assert study.experts.name == "experts_moe-abc123"
    assert {study.runs, study.results, study.experts}.isdisjoint({own.runs, own.results, own.experts})
    assert study_mod.Study.given(hf, "moe").results.name == "results_moe"


def test_grid_fine_tunes_the_study_base_and_crosses_learning_rates(study_mod, tmp_path):
    base = tmp_path / "given" / "hf"
    study = study_mod.Study(base, tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    experts = {"esft_token": study_mod.ROOT / "experiments/esft_paper/experts/translate/esft_token.json"}
    grid = load_grid(study_mod.grid(study, "translate", experts, ["fft", "esft_token"]))
    assert sorted(grid.cells) == ["esft_token", "fft"]
    for overrides in grid.cells.values():
        assert overrides["model.init_args.model_name_or_path"] == str(base)
        assert overrides["data.init_args.tasks"] == ["translate"]
    path = study_mod.grid(study, "translate", experts, ["fft", "esft_token"], lrs=[3e-3, 1e-2], stem="lr_translate")
    assert path == tmp_path / "runs" / "grids" / "lr_translate.yaml"
    cells = load_grid(path).cells
    # lr_check reads the method back as the part of the cell name before the comma
    assert {(name.split(",")[0], o["model.init_args.optim.lr"]) for name, o in cells.items()} == \
        {(m, lr) for m in ("fft", "esft_token") for lr in (3e-3, 1e-2)}
    assert "model.init_args.experts" not in cells["fft,lr=0.003"]


def test_task_score_reads_the_task_own_metric(study_mod):
    # translate logs BLEU beside its chrF: the score is chrF, the task's own metric
    assert study_mod.task_score({"eval/translate/bleu": 0.1, "eval/translate/chrf": 0.25}, "translate") == 0.25
    assert study_mod.task_score({"eval/sort_words/exact_match": 0.5}, "sort_words") == 0.5
    assert study_mod.task_score({"eval/translate": 0.3}, "translate") == 0.3  # runs recorded before metric names
    assert study_mod.task_score({}, "translate") is None


def test_rates_chosen_on_validation_reach_each_cell_and_controls_draw_per_seed(study_mod, tmp_path):
    from esft.runconfig import with_seed

    study = study_mod.Study(tmp_path / "hf", tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    assert study_mod.selected_lrs(study, "translate", ["fft"]) == {}  # before lr_select: finetune.yaml's rate
    study.results.mkdir()
    (study.results / "lr_select.json").write_text('{"translate": {"fft": 0.001, "esft_token": 0.003, "esft_gate": 0.01}}')
    cells = ["fft", "lora", "esft_token", "random_token_x", "esft_token_p0.3", "esft_gate_p0.05", "random_gate_x"]
    assert study_mod.selected_lrs(study, "translate", cells) == {
        "fft": 0.001, "esft_token": 0.003, "random_token_x": 0.003, "esft_token_p0.3": 0.003,
        "esft_gate_p0.05": 0.01, "random_gate_x": 0.01}  # lora was not selected: finetune.yaml's
    experts = {c: study_mod.ROOT / f"experiments/esft_paper/experts/translate/{c}.json" for c in cells[2:]}
    experts["random_token_x"] = study_mod.ROOT / "experiments/esft_paper/experts/translate/random_token_x_seed{seed}.json"
    path = study_mod.grid(study, "translate", experts, cells, cell_lrs=study_mod.selected_lrs(study, "translate", cells))
    grid = load_grid(path)
    lr = "model.init_args.optim.lr"
    assert grid.cells["fft"][lr] == 0.001 and grid.cells["random_token_x"][lr] == 0.003 and lr not in grid.cells["lora"]
    draw = grid.cells["random_token_x"]["model.init_args.experts"]
    assert with_seed(draw, 2).endswith("translate/random_token_x_seed2.json")


def test_specialisation_reads_concentration_and_task_overlap(study_mod, tmp_path):
    import json

    study = study_mod.Study(tmp_path / "hf", tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    tables = {"intent_json": [0.5, 0.5, 0.0, 0.0], "extract_fields": [0.0, 0.5, 0.5, 0.0]}
    chosen = {"intent_json": [0, 1], "extract_fields": [1, 2]}
    for task, token in tables.items():
        (study.experts / task).mkdir(parents=True)
        (study.experts / task / "scores.json").write_text(json.dumps(
            {"num_experts": 4, "top_k": 2, "token": {"1": token}, "gate": {"1": token}}))
        (study.experts / task / "esft_token.json").write_text(json.dumps({"experts": {"1": chosen[task]}}))
    text = "\n".join(study_mod.specialisation(study))
    assert "| intent_json | 2.0 | 0.50 | 2.0 |" in text
    assert "| intent_json / extract_fields | 0.50 | 0.33 |" in text  # TV distance 0.5; experts {1} of {0, 1, 2}


def fake_lr_sweep(loss, swept):
    """A stand-in for `sweep` on lr_select's grids: each run's done.json and validation_loss.json
    cache, its validation loss `loss(cell, lr, seed)`, its test score the rate itself (so that the
    test score prefers other rates than the loss: it must not be what chooses)."""
    import json

    import yaml

    def fake_sweep(grid_path, out, seed):
        spec = yaml.safe_load(grid_path.read_text())
        for cell in spec["cells"]:
            for lr in spec["axes"]["model.init_args.optim.lr"]:
                run = out / f"{cell},lr={lr:g}" / f"seed{seed}"
                if run.exists():  # a sweep skips finished runs
                    continue
                swept.append((cell, lr, seed))
                run.mkdir(parents=True)
                (run / "done.json").write_text(json.dumps({
                    "cell": f"{cell},lr={lr:g}", "seed": seed, "metrics": {"eval/translate/chrf": lr},
                    "overrides": {"model.init_args.optim.lr": lr}}))
                (run / "validation_loss.json").write_text(json.dumps({"loss": loss(cell, lr, seed)}))
    return fake_sweep


def test_lr_select_chooses_by_validation_loss_and_extends_past_the_grid_edge(study_mod, tmp_path, monkeypatch):
    import json

    study = study_mod.Study(tmp_path / "hf", tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    # validation loss: fft best at 1e-3 (inside the grid); lora keeps improving past the grid's 1e-2
    val = {"fft": lambda lr: abs(lr - 1e-3), "lora": lambda lr: -lr}
    swept = []
    monkeypatch.setattr(study_mod, "sweep", fake_lr_sweep(lambda cell, lr, seed: val[cell](lr), swept))
    monkeypatch.setattr(study_mod, "expert_configs", lambda study, task: {})
    chosen = study_mod.lr_select(study, ["translate"], ["fft", "lora"], [3e-4, 1e-3, 3e-3, 1e-2], seeds=[0])
    assert chosen == {"translate": {"fft": 1e-3, "lora": 0.09}}
    assert [s for s in swept if s[1] > 1e-2] == [("lora", 0.03, 0), ("lora", 0.09, 0)]  # EXTEND = 2 steps out, then stop
    (study.results / "lr_select.json").write_text('{"intent_json": {"fft": 0.01}}')  # another task's choice stays
    assert study_mod.lr_select(study, ["translate"], ["fft", "lora"], [3e-4, 1e-3, 3e-3, 1e-2], seeds=[0]) == chosen
    assert json.loads((study.results / "lr_select.json").read_text()) == {
        "intent_json": {"fft": 0.01}, "translate": {"fft": 0.001, "lora": 0.09}}
    assert "| translate | lora | 0.09 |" in (study.results / "lr_select.md").read_text()
    assert "| lr 0.01 | lr 0.03 | lr 0.09 |" in (study.results / "lr_select.md").read_text()  # the rerun's table too
    assert len([s for s in swept if s[1] > 1e-2]) == 2  # the rerun tried nothing more beyond the edge


def test_lr_select_over_seeds_chooses_by_the_mean_validation_loss(study_mod, tmp_path, monkeypatch):
    study = study_mod.Study(tmp_path / "hf", tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    # seed 0 prefers 1e-3 a little, seed 1 prefers 3e-3 by more: their mean prefers 3e-3
    loss = {0: {3e-4: 2.0, 1e-3: 1.0, 3e-3: 1.1, 1e-2: 2.0, 0.03: 0.1}, 1: {3e-4: 2.0, 1e-3: 1.5, 3e-3: 0.5, 1e-2: 2.0}}
    swept = []
    monkeypatch.setattr(study_mod, "sweep", fake_lr_sweep(lambda cell, lr, seed: loss[seed][lr], swept))
    monkeypatch.setattr(study_mod, "expert_configs", lambda study, task: {})
    # an earlier single-seed run at a rate seed 1 never ran: not a mean over the seeds, not a candidate
    study_mod.sweep(study_mod.grid(study, "translate", {}, ["fft"], [0.03], stem="one"), study.runs / "lr_select" / "translate", 0)
    swept.clear()
    assert study_mod.lr_select(study, ["translate"], ["fft"], lrs, seeds=[0, 1]) == {"translate": {"fft": 3e-3}}
    assert sorted(swept) == sorted(("fft", lr, s) for lr in lrs for s in (0, 1))
    table = (study.results / "lr_select.md").read_text()
    assert "mean over seeds 0, 1;" in table
    # the mean loss per rate, and the mean test score (the rate itself, as a %)
    assert "| translate | fft | 0.003 | 2.000 (0.0) | 1.250 (0.1) | 0.800 (0.3) | 2.000 (1.0) |" in table


def test_p_ablation_runs_each_p_at_its_methods_rate_and_tabulates_the_mean_over_tasks(study_mod, tmp_path, monkeypatch):
    import json

    import yaml

    study = study_mod.Study(tmp_path / "hf", tmp_path / "runs", tmp_path / "results", tmp_path / "experts", own_base=False)
    study.results.mkdir()
    (study.results / "lr_select.json").write_text(json.dumps({t: {"esft_token": 0.01, "esft_gate": 0.03}
                                                              for t in ("translate", "extract_fields")}))
    configs = {}
    for task in ("translate", "extract_fields"):
        (study.experts / task).mkdir(parents=True)
        for m, ps in study_mod.P_VALUES.items():
            for p in ps:
                cell = f"esft_{m}_p{p:g}"
                configs[task, cell] = study.experts / task / f"{cell}.json"
                k = int(10 * p) or 1  # more experts per layer for a larger p
                configs[task, cell].write_text(json.dumps({"experts": {"1": list(range(k)), "2": list(range(k))}}))
    for task in ("translate", "extract_fields"):  # the tables' ESFT cells select as their p cells do
        for m, p in study_mod.TABLE_P.items():
            configs[task, f"esft_{m}"] = configs[task, f"esft_{m}_p{p:g}"]
    rates, where = {}, set()

    def fake_sweep(grid_path, out, seed):
        spec = yaml.safe_load(grid_path.read_text())
        task = spec["set"]["data.init_args.tasks"][0]
        for cell, overrides in spec["cells"].items():
            rates[cell] = overrides["model.init_args.optim.lr"]
            where.add((out.relative_to(study.runs).parts[0], cell))
            run = out / cell / f"seed{seed}"
            run.mkdir(parents=True)
            p = float(cell.rsplit("_p", 1)[1]) if "_p" in cell else study_mod.TABLE_P[cell.split("_")[1]]
            # specialized score p (translate) or 2p (extract_fields); general 1 - p
            score = p if task == "translate" else 2 * p
            metrics = {f"eval/{task}": score, **{f"eval/{g}": 1 - p for g in study_mod.GENERAL_NAMES}}
            (run / "done.json").write_text(json.dumps({"cell": cell, "seed": seed, "metrics": metrics,
                                                       "overrides": {"model.init_args.optim.lr": rates[cell]}}))
            # held-out losses (heldout_losses' cache in the run's export): specialized 4 - 10p on
            # translate, 5 - 10p on extract_fields; general 1 + seed
            (run / "hf").mkdir()
            (run / "hf" / "heldout_loss.json").write_text(json.dumps(
                {task: (4 if task == "translate" else 5) - 10 * p, **{g: 1.0 + seed for g in study_mod.GENERAL_NAMES}}))

    monkeypatch.setattr(study_mod, "sweep", fake_sweep)
    monkeypatch.setattr(study_mod, "ROOT", tmp_path)  # grids name expert configs relative to the repository
    monkeypatch.setattr(study_mod, "expert_configs", lambda study, task: {c: path for (t, c), path in configs.items() if t == task})
    stray = study.runs / "p_ablation" / "translate" / "esft_token_p0.2" / "seed0"  # an earlier version's run of it
    stray.mkdir(parents=True)
    (stray / "done.json").write_text(json.dumps({"cell": "esft_token_p0.2", "seed": 0, "metrics": {}, "overrides": {}}))
    study_mod.p_ablation(study, ["translate", "extract_fields"], seeds=[0, 1])
    # the tables' p (token 0.2, gate 0.1) is the tables' own cell, run in (or read from) their sweep
    assert rates == {**{f"esft_token_p{p:g}": 0.01 for p in study_mod.P_VALUES["token"] if p != 0.2},
                     **{f"esft_gate_p{p:g}": 0.03 for p in study_mod.P_VALUES["gate"] if p != 0.1},
                     "esft_token": 0.01, "esft_gate": 0.03}
    assert {c for d, c in where if d == "sweep"} == {"esft_token", "esft_gate"}
    assert [p.name for p in (study.runs / "p_ablation" / "translate" / "esft_token_p0.2").iterdir()] == ["seed0"]
    table = (study.results / "p_ablation.md").read_text()
    # token p=0.3: specialized mean(30, 60) = 45 on both seeds, general 70; 3 experts per layer
    # losses: specialized mean(4 - 3, 5 - 3) = 1.5; general 1 (seed 0) and 2 (seed 1): 1.5 ± 0.707
    assert "| esft_token | 0.3 | 3.00 | 45.0 ± 0.0 | 70.0 ± 0.0 | 1.500 ± 0.000 | 1.500 ± 0.707 | 2 |" in table
    assert "| esft_gate | 0.05 | 1.00 | 7.5 ± 0.0 | 95.0 ± 0.0 | 4.000 ± 0.000 | 1.500 ± 0.707 | 2 |" in table
    # token p=0.2, read from the tables' runs: specialized mean(20, 40) = 30; 2 experts per layer
    assert "| esft_token | 0.2 | 2.00 | 30.0 ± 0.0 | 80.0 ± 0.0 | 2.500 ± 0.000 | 1.500 ± 0.707 | 2 |" in table
    # runs at another rate than the chosen one, the tables' and its own, are refused, not read
    (study.results / "lr_select.json").write_text(json.dumps({t: {"esft_token": 0.02, "esft_gate": 0.03}
                                                              for t in ("translate", "extract_fields")}))
    with pytest.raises(SystemExit, match=r"sweep/translate/esft_token/seed0 \(0.01, now 0.02\)(.|\n)*"
                                         r"p_ablation/translate/esft_token_p0.3/seed0 \(0.01, now 0.02\)"):
        study_mod.p_ablation(study, ["translate", "extract_fields"], seeds=[0, 1])
    assert (study.results / "p_ablation.png").stat().st_size > 0


def test_tables_refuse_finished_runs_at_a_rate_lr_select_has_since_changed(study_mod, tmp_path, monkeypatch):
    import json

    hf = tmp_path / "base" / "hf"
    hf.mkdir(parents=True)
    (hf / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(study_mod, "ROOT", tmp_path)
    monkeypatch.setattr(study_mod, "HERE", tmp_path / "experiment")
    study = study_mod.Study.given(hf, "b")
    for cell, lr in (("fft", 0.003), ("esft_token", 0.03), ("lora", None)):
        run = study.runs / "sweep" / "translate" / cell / "seed0"
        run.mkdir(parents=True)
        overrides = {"model.init_args.optim.lr": lr} if lr else {}  # lora ran at finetune.yaml's rate
        (run / "done.json").write_text(json.dumps({"cell": cell, "seed": 0, "metrics": {}, "overrides": overrides}))
    study.results.mkdir(parents=True)
    (study.results / "lr_select.json").write_text(json.dumps({"translate": {"fft": 0.01, "esft_token": 0.03}}))
    swept = []
    monkeypatch.setattr(study_mod, "sweep", lambda grid_path, out, seed: swept.append(out))
    monkeypatch.setattr(study_mod, "vanilla", lambda study: {})
    monkeypatch.setattr(study_mod, "expert_configs", lambda study, task: {})
    monkeypatch.setattr(study_mod, "grid", lambda *args, **kwargs: tmp_path / "grid.yaml")
    monkeypatch.setattr(study_mod, "collect", lambda study: [])
    monkeypatch.setattr(study_mod, "report", lambda study, rows, base: None)
    argv = ["--base", str(hf), "--name", "b", "--tasks", "translate", "--seeds", "0", "--no-ablations"]
    with pytest.raises(SystemExit, match=r"1 finished runs .*\n  sweep/translate/fft/seed0 \(0.003, now 0.01\)\nMove them"):
        study_mod.main(argv)
    assert swept == []  # nothing ran
    (study.results / "lr_select.json").write_text(json.dumps({"translate": {"fft": 0.003, "esft_token": 0.03}}))
    study_mod.main(argv)  # the finished runs' rates are the chosen ones: the tables go on
    assert swept == [study.runs / "sweep" / "translate"]


def test_validation_loss_scores_problems_after_the_training_ones_not_the_test_problems(study_mod, tmp_path, monkeypatch):
    import importlib

    from esft.callbacks.evaluation import TaskEvaluation
    from esft.data.tasks import build_task

    scored = []

    def fake_perplexity(model, tokenizer, records, max_length):
        scored.append(records)
        return {"loss": 1.25}

    # the package exports a function of the module's name: the module itself from importlib
    monkeypatch.setattr(importlib.import_module("esft.evaluation.perplexity"), "perplexity", fake_perplexity)
    monkeypatch.setattr(importlib.import_module("esft.objectives.loading"), "load_model", lambda *args: (None, None))
    monkeypatch.setattr(study_mod, "FINETUNE", {"data": {"init_args": {"num_train_per_task": 300, "max_length": 256}}})
    run = {"dir": tmp_path, "seed": 1}
    assert study_mod.validation_loss(run, "translate") == 1.25
    assert study_mod.validation_loss(run, "translate") == 1.25 and len(scored) == 1  # the second from the cache
    key = str  # a record as text: its prompt and answer
    val = {key(r) for r in scored[0]}
    task = build_task("translate")
    assert len(val) == study_mod.VAL_PROBLEMS
    assert val == {key(r) for r in task.generate(300 + study_mod.VAL_PROBLEMS, 1, "train")[300:]}
    assert val.isdisjoint(key(r) for r in task.generate(300, 1, "train"))  # not trained on
    test = task.generate(100, TaskEvaluation(tasks=[]).seed, "heldout")  # what the tables score
    assert val.isdisjoint(key(r) for r in test)
