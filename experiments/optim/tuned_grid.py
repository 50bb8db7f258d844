"""Write experiments/optim/tuned_grid.yaml: the best trial of the Optuna study (experiments/optim/tune)
as one sweep cell, so that it runs with the study's 3 seeds beside the default (adamw_cosine).

    python experiments/optim/tuned_grid.py
    esft sweep --config configs/sft/optim_study.yaml --grid experiments/optim/tuned_grid.yaml \\
        --out experiments/optim/results
"""

from pathlib import Path

import optuna
import yaml

from esft.tune import load_space

HERE = Path(__file__).parent


def main() -> None:
    space = load_space(HERE / "search.yaml")
    study = optuna.load_study(study_name="esft-tune", storage=f"sqlite:///{(HERE / 'tune' / 'study.db').resolve()}")
    best = study.best_trial
    cell = {key: best.params[name] for key, name in space.names.items()}
    header = (f"# esft sweep --config configs/sft/optim_study.yaml --grid experiments/optim/tuned_grid.yaml "
              f"--out experiments/optim/results\n#\n# Written by experiments/optim/tuned_grid.py: the best of "
              f"{len(study.trials)} Optuna trials (trial {best.number}, val/loss {best.value:.4g} at seed 0).\n")
    (HERE / "tuned_grid.yaml").write_text(header + yaml.safe_dump({"seeds": [0, 1, 2], "cells": {"tuned": cell}}, sort_keys=False))
    print(cell)


if __name__ == "__main__":
    main()
