"""Held-out preference accuracy and log-prob margins of the SFT start and of every run's model, alike.

    python experiments/preference/heldout.py --out experiments/preference/results

The runs' own ``val/accuracy`` is not comparable across cells: KTO validates on unpaired rows
(the share whose implicit reward has the sign of their label) and SFT logs only ``val/loss``. This
script validates every exported model (``OUT/<cell>/seed<k>/hf``, and the start) on the same
held-out pairs with `esft.objectives.PreferenceModule` (reference-free, ``simpo`` with beta 1 and
gamma 0, so that its ``rewards/margins`` is the mean per-token log-prob margin) and writes
``OUT/heldout.csv`` (one row per model; a rerun adds only the models not in it yet) and
``OUT/heldout.md`` (mean ± sample std per cell):

- ``accuracy``: the share of pairs whose chosen answer has the higher summed log-prob;
- ``token_accuracy``: the same with the mean per-token log-prob (no length effect);
- ``margin``: the mean summed log-prob margin, chosen minus rejected (nats per pair);
- ``token_margin``: the mean per-token log-prob margin (nats per token);
- ``logp_chosen``: the mean summed log-prob of the chosen answers.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import lightning as L

from esft.data import PreferenceDataModule
from esft.objectives import PreferenceModule
from esft.reports import markdown_table, summarise, write_csv

COLUMNS = {"accuracy": "val/accuracy", "token_accuracy": "val/rewards/accuracy", "margin": None,
           "token_margin": "val/rewards/margins", "logp_chosen": "val/logps/chosen"}


def evaluate(model_dir: str, pairs: str) -> dict[str, float]:
    """`model_dir`'s held-out statistics on the pairs file `pairs` (module docstring)."""
    module = PreferenceModule(model_name_or_path=model_dir, loss_type="simpo", beta=1.0, simpo_gamma=0.0)
    data = PreferenceDataModule(path=pairs, val_path=pairs, tokenizer_name=model_dir, max_length=128,
                                max_tokens=1024, num_workers=0)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    row = {name: float(metrics[key]) for name, key in COLUMNS.items() if key}
    row["margin"] = float(metrics["val/logps/chosen"] - metrics["val/logps/rejected"])
    return row


def previous(path: Path) -> list[dict]:
    """The records of an earlier ``heldout.csv`` (none when it is missing)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{"cell": r["cell"], "seed": int(r["seed"]), "metrics": {k: float(r[k]) for k in COLUMNS}}
                for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/preference/results", help="the sweep's output directory")
    parser.add_argument("--start", default="runs/quickstart/hf", help="the SFT model every cell starts from")
    parser.add_argument("--pairs", default=None, help="held-out pairs (default OUT/data/pairs_heldout.jsonl)")
    args = parser.parse_args()
    out = Path(args.out)
    pairs = args.pairs or str(out / "data" / "pairs_heldout.jsonl")
    models = [("start", 0, args.start)] + [(d.parent.parent.name, int(d.parent.name.removeprefix("seed")), str(d))
                                           for d in sorted(out.glob("*/seed*/hf")) if (d.parent / "done.json").exists()]
    records = previous(out / "heldout.csv")  # rerunning evaluates only the models not in it yet
    known = {(r["cell"], r["seed"]) for r in records}
    for cell, seed, path in models:
        if (cell, seed) in known:
            continue
        records.append({"cell": cell, "seed": seed, "metrics": evaluate(path, pairs)})
        print(cell, seed, records[-1]["metrics"], flush=True)
    names = list(COLUMNS)
    write_csv(out / "heldout.csv", ["cell", "seed", *names], [{**r, **r["metrics"]} for r in records])
    _, _, md_rows = summarise(records, "cell", list(dict.fromkeys(r["cell"] for r in records)), names)
    (out / "heldout.md").write_text(markdown_table(["cell", "n", *names], md_rows, numeric=names) + "\n")
    print((out / "heldout.md").read_text(), end="")


if __name__ == "__main__":
    main()
