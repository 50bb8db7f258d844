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
