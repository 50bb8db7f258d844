"""experiments/preference: its data layouts hold the same pairs, and its grid gives every cell the same budget."""

import importlib.util
from pathlib import Path

from esft.commands.sweep import load_grid, plan
from esft.data.preference import to_pair, to_unpaired
from esft.data.records import to_record
from esft.runconfig import get_dotted, load_config

STUDY = Path(__file__).resolve().parent.parent / "experiments" / "preference"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"preference_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layouts_hold_the_same_pairs_as_preference_kto_and_sft_rows():
    make_data = load_script("make_data")
    pairs = make_data.split_pairs("train", 5, seed=0)
    rows = make_data.layouts(pairs, seed=0)
    assert len(rows["pairs"]) == len(rows["sft"]) == len(pairs) and len(rows["kto"]) == 2 * len(pairs)
    labelled = {(str(r["prompt"]), r["completion"]): r["label"] for r in rows["kto"]}
    for pair, row, sft in zip(pairs, rows["pairs"], rows["sft"]):
        parsed = to_pair(row)  # what PreferenceDataModule reads
        assert parsed["chosen"] == pair["chosen"] and parsed["rejected"] == pair["rejected"]
        assert parsed["history"] == pair["history"]
        assert to_record(sft)["messages"] == pair["history"] + pair["chosen"]
        prompt = str(pair["history"])
        assert labelled[(prompt, pair["chosen"][0]["content"])] is True
        assert labelled[(prompt, pair["rejected"][0]["content"])] is False
    for row in rows["kto"]:
        assert to_unpaired(row)["desirable"] is row["label"]


def test_grid_gives_every_cell_the_same_steps_start_and_optimizer():
    base = load_config(STUDY / "base.yaml")
    runs = plan(base, load_grid(STUDY / "grid.yaml"), Path("/nonexistent/out"))
    assert sorted({r.cell for r in runs}) == ["dpo", "ipo", "kto", "orpo", "sft", "simpo"]
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len(runs) == 18
    for run in runs:
        cfg = run.config
        assert get_dotted(cfg, "data.init_args.seed") == run.seed
        assert get_dotted(cfg, "trainer.max_steps") == get_dotted(base, "trainer.max_steps")
        assert get_dotted(cfg, "model.init_args.model_name_or_path") == "runs/quickstart/hf"
        assert get_dotted(cfg, "model.init_args.optim") == get_dotted(base, "model.init_args.optim")
        module = get_dotted(cfg, "model.class_path").rsplit(".", 1)[-1]
        assert module == ("SFTModule" if run.cell == "sft" else "PreferenceModule")
        path = get_dotted(cfg, "data.init_args.path")
        kind = {"sft": "sft", "kto": "kto"}.get(run.cell, "pairs")
        assert path.endswith(f"{kind}_train.jsonl") and get_dotted(cfg, "data.init_args.val_path").endswith(
            f"{kind}_heldout.jsonl")
