"""Every built-in task is learnable: a short CPU training run on the task alone scores clearly
above a trivial baseline on held-out problems. Slow (about a minute per task):

    python -m pytest -m slow tests/test_learnability.py
"""

import json
from collections import Counter

import pytest
import yaml

from esft.cli import main
from esft.data.tasks import TASKS, get_task

STEPS = 800
MARGIN = 0.1


def trivial_baseline(task: str, heldout: list[dict]) -> float:
    """Score of answering every held-out problem with the most common training answer."""
    t = get_task(task)
    common = Counter(r["messages"][-1]["content"] for r in t.generate(2000, seed=0)).most_common(1)[0][0]
    return sum(t.score(r, common) for r in heldout) / len(heldout)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_is_learnable(task, tmp_path):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "limit_val_batches": 0,
            "enable_progress_bar": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "", "version": ""}},
            "callbacks": [{"class_path": "esft.callbacks.TaskEvaluation",
                           "init_args": {"tasks": [task], "num_examples": 50, "max_new_tokens": 128}}],
        },
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 512,
                                                 "num_hidden_layers": 4, "num_attention_heads": 8,
                                                 "num_key_value_heads": 8, "max_position_embeddings": 1024,
                                                 "tie_word_embeddings": True},
                                "optim": {"lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 30, "min_lr_ratio": 0.05}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": [task], "num_train_per_task": 20000, "num_val_per_task": 0,
                               "max_length": 256, "max_tokens": 1024}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    results = json.loads((tmp_path / "eval.json").read_text())
    heldout = get_task(task).generate(50, seed=0, split="heldout")
    baseline = trivial_baseline(task, heldout)
    after = results["after"][task]
    print(f"{task}: trivial {baseline:.3f}, before {results['before'][task]:.3f}, after {after:.3f}")
    assert after >= baseline + MARGIN, f"{task}: {after:.3f} is not clearly above the trivial {baseline:.3f}"
