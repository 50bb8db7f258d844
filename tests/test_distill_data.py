"""`esft distill-data`: teacher responses filtered by the task verifier (sequence-level KD data),
and the top-k teacher cache of a config's training data."""

import json

import pytest
import torch
import yaml

import esft.evaluation
from esft.data import DistillDataModule
from esft.data.records import load_records
from esft.data.tasks import get_task
from esft.data.teacher_cache import TeacherCache
from esft.commands.distill_data import main
from esft.evaluation import Rollout
from esft.models import build_model, load_tokenizer

from conftest import TINY


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = load_tokenizer("builtin")
    build_model(tokenizer, model_config=TINY["llama"], attn_implementation="sdpa").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_responses_are_filtered_by_the_verifier(teacher_dir, tmp_path, monkeypatch):
    records = get_task("arithmetic").generate(2, seed=0)
    answers = [r["messages"][-1]["content"] for r in records]
    texts = [answers[0], "nonsense", answers[1], answers[1]]  # k = 2 per prompt, in prompt order

    def fake_rollout(model, tokenizer, conversations, max_new_tokens, batch_size, num_samples, progress=False, **kw):
        assert num_samples == 2 and [c[-1]["role"] for c in conversations] == ["user", "user"]
        assert kw["do_sample"] and kw["temperature"] == 0.7
        return [Rollout([1], [2], t, truncated=False) for t in texts]

    monkeypatch.setattr(esft.evaluation, "rollout", fake_rollout)
    common = ["responses", "--teacher", str(teacher_dir), "--tasks", "arithmetic", "--num-prompts", "2",
              "--k", "2", "--temperature", "0.7"]
    kept = {}
    for name, extra in {"verified": [], "unique": ["--unique"], "all": ["--min-score", "0"]}.items():
        out = tmp_path / f"{name}.jsonl"
        summary = main(common + ["--out", str(out)] + extra)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        kept[name] = [r["messages"][-1]["content"] for r in rows]
        assert summary["kept"] == len(rows) and summary["sampled"] == 4
        assert all(r["task"] == "arithmetic" and r["messages"][-1]["role"] == "assistant" for r in rows)
    assert kept["verified"] == [answers[0], answers[1], answers[1]]
    assert kept["unique"] == [answers[0], answers[1]]
    assert kept["all"] == texts
    loaded, _ = load_records(str(tmp_path / "verified.jsonl"))  # an ordinary SFT dataset
    assert len(loaded) == 3


def test_topk_cache_of_a_config(teacher_dir, tmp_path):
    cfg = {"model": {"class_path": "esft.objectives.DistillModule", "init_args": {"tokenizer": "builtin"}},
           "data": {"class_path": "esft.data.DistillDataModule",
                    "init_args": {"tasks": ["reverse_words"], "num_train_per_task": 10, "max_length": 64,
                                  "max_tokens": 128, "teacher_cache": "ignored-while-building"}}}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "top4.safetensors"
    summary = main(["topk", "--config", str(path), "--teacher", str(teacher_dir), "--k", "4", "--out", str(out),
                    "--max-tokens", "64"])
    cache = TeacherCache(out)
    assert len(cache) == 10 and cache.k == 4 and cache.ids.shape == (summary["tokens"], 4)
    assert (cache.logprobs[:, :-1] >= cache.logprobs[:, 1:]).all()  # sorted top-k
    assert (cache.logprobs.exp().sum(-1) <= 1 + 1e-5).all()
    # --data-seed: the cache of another data seed's examples, which that seed's data module accepts
    main(["topk", "--config", str(path), "--teacher", str(teacher_dir), "--k", "4", "--out", str(tmp_path / "s1.st"),
          "--data-seed", "1"])
    seeded = TeacherCache(tmp_path / "s1.st")
    assert not torch.equal(seeded.fingerprints, cache.fingerprints)
    data = {**cfg["data"]["init_args"], "seed": 1, "teacher_cache": str(tmp_path / "s1.st"), "tokenizer_name": "builtin"}
    DistillDataModule(**data).setup("fit")
    with pytest.raises(ValueError, match="rebuild it"):
        DistillDataModule(**{**data, "seed": 0}).setup("fit")
