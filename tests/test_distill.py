"""DistillModule end to end through the CLI (online, on-policy, cached teacher), the teacher's
isolation from training, cached-vs-online equivalence on real batches, and the teacher cache file."""

from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.apply_func import move_data_to_device

from esft.cli import main
from esft.data import DistillDataModule
from esft.data.distill import packed_prompts
from esft.data.teacher_cache import TeacherCache, write_teacher_cache
from esft.objectives import DistillModule

from conftest import TINY

TEACHER = dict(TINY["llama"], hidden_size=32, intermediate_size=64, num_hidden_layers=1)
DATA = {"tasks": ["arithmetic", "reverse_words"], "num_train_per_task": 24, "num_val_per_task": 4,
        "max_length": 64, "max_tokens": 256}


def run_config(root: Path, model: dict, data: dict | None = None, steps: int = 3, **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "log_every_n_steps": 1,
                    "limit_val_batches": 1, "val_check_interval": steps, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root), "name": "", "version": ""}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}], **trainer},
        "model": {"class_path": "esft.objectives.DistillModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16,
                                "optim": {"lr": 1e-2, "warmup_steps": 1}, **model}},
        "data": {"class_path": "esft.data.DistillDataModule", "init_args": {**DATA, **(data or {})}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_online_and_on_policy_from_yaml(tmp_path, monkeypatch):
    calls = []
    original = DistillModule.on_policy_batch
    monkeypatch.setattr(DistillModule, "on_policy_batch", lambda self, b: calls.append(1) or original(self, b))
    cli = main(["fit", "--config", str(run_config(tmp_path, {"teacher_config": TEACHER, "divergence": "jsd",
                                                            "alpha": 0.5, "lmbda": 0.5,
                                                            "on_policy_max_new_tokens": 6}, steps=4))])
    module = cli.model
    assert cli.trainer.global_step == 4
    logged = cli.trainer.logged_metrics
    assert torch.isfinite(logged["train/loss"]) and torch.isfinite(logged["train/kd"])
    assert 0 < len(calls) < 4  # lmbda 0.5: some steps on student samples, some on the data
    # the teacher is frozen, outside the optimizer and outside the checkpoint
    teacher = module.teacher
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    optimized = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["teacher_config"] == TEACHER
    from esft.objectives.loading import load_model  # `esft eval` loads the student from the checkpoint

    student, _ = load_model(str(tmp_path / "ckpt" / "last.ckpt"), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), module.model.state_dict().values()))


def test_teacher_weights_do_not_change(tmp_path):
    module = DistillModule(model_config=TINY["llama"], teacher_config=TEACHER, loss_chunk_size=8)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    dm = DistillDataModule(**DATA, layout="rows")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kd, ce, n = module.distill_loss(batch)
    (kd / n).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())


def test_student_equal_to_teacher_gives_zero_kd():
    module = DistillModule(model_config=TINY["llama"], teacher_config=TINY["llama"], loss_chunk_size=8)
    module.teacher.load_state_dict(module.model.state_dict())
    dm = DistillDataModule(**DATA, layout="rows")
    dm.setup("fit")
    kd, ce, n = module.distill_loss(next(iter(dm.train_dataloader())))
    assert int(n) > 0 and abs(kd.item()) < 1e-4 and ce.item() > 0


def test_vocabulary_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillModule(model_config=TINY["llama"], teacher_config=dict(TEACHER, vocab_size=4000))
    with pytest.raises(ValueError, match="exactly one"):
        DistillModule(model_config=TINY["llama"], teacher="x", teacher_config=TEACHER)


def test_no_teacher_is_a_clear_error():
    module = DistillModule(model_config=TINY["llama"])
    dm = DistillDataModule(**DATA, layout="rows")
    dm.setup("fit")
    with pytest.raises(ValueError, match="no teacher"):
        module.distill_loss(next(iter(dm.train_dataloader())))


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    """A teacher and its full-vocabulary cache of the DATA examples."""
    torch.manual_seed(0)
    module = DistillModule(model_config=TINY["llama"], teacher_config=TEACHER, loss_chunk_size=16)
    dm = DistillDataModule(**DATA)
    dm.setup("fit")
    vocab = module.teacher.get_output_embeddings().weight.shape[0]
    path = tmp_path_factory.mktemp("cache") / "teacher.safetensors"
    summary = write_teacher_cache(module.teacher, dm.train_examples, path, k=vocab, max_tokens=200, progress=False)
    return module, path, summary


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_cached_full_vocabulary_matches_online(full_cache, divergence):
    module, path, summary = full_cache
    module.hparams.divergence = divergence
    online_dm = DistillDataModule(**DATA, layout="flat")
    cached_dm = DistillDataModule(**DATA, layout="flat", teacher_cache=str(path))
    for dm in (online_dm, cached_dm):
        dm.setup("fit")
    for online, cached in zip(online_dm.train_dataloader(), cached_dm.train_dataloader()):
        assert "teacher_topk_ids" in cached and "teacher_topk_ids" not in online
        assert cached["teacher_topk_ids"].shape[0] == int((online["labels"][:, 1:] != -100).sum())
        a, b = module.distill_loss(online), module.distill_loss(cached)
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[1], a[1])
        assert int(a[2]) == int(b[2])
    assert summary["tokens"] == sum(len(e["labels"]) - 1 - e["labels"][1:].count(-100) for e in cached_dm.train_examples)


def test_cache_from_other_data_is_rejected(full_cache):
    _, path, _ = full_cache
    dm = DistillDataModule(**{**DATA, "seed": 1}, teacher_cache=str(path))
    with pytest.raises(ValueError, match="does not match|holds"):
        dm.setup("fit")
    assert len(TeacherCache(path)) == 48


def test_fit_on_cache_without_teacher(tmp_path):
    module = DistillModule(model_config=TINY["llama"], teacher_config=TEACHER)
    dm = DistillDataModule(**DATA)
    dm.setup("fit")
    cache = tmp_path / "top8.safetensors"
    write_teacher_cache(module.teacher, dm.train_examples, cache, k=8, progress=False)
    cli = main(["fit", "--config", str(run_config(tmp_path / "run", {"divergence": "reverse_kl"},
                                                  {"teacher_cache": str(cache)}))])
    assert cli.model.teacher is None and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.logged_metrics["train/kd"])


def test_on_policy_batch_continues_the_batch_prompts():
    module = DistillModule(model_config=TINY["llama"], teacher_config=TEACHER, on_policy_max_new_tokens=5)
    dm = DistillDataModule(**DATA, layout="rows")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prompts = packed_prompts(batch)
    assert prompts and all(dm.prompt_conversation(p)[-1]["role"] == "user" for p in prompts)

    class Trainer:  # what on_policy_batch reads from the trainer
        datamodule = dm
    module._trainer = Trainer()
    torch.manual_seed(0)
    new = module.on_policy_batch(batch)
    assert sorted(packed_prompts(new)) == sorted(prompts)
    trained = int((new["labels"] != -100).sum())
    assert 0 < trained <= 5 * len(prompts)
    kd, _, n = module.distill_loss(move_data_to_device(new, module.device))
    assert torch.isfinite(kd) and int(n) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_gpu_bf16_varlen_with_on_policy_steps(tmp_path):
    """On CUDA `auto` attention is flash varlen (flat batches) for student and teacher alike; on-policy
    steps generate through SDPA and go back to varlen."""
    cli = main(["fit", "--config", str(run_config(tmp_path, {"teacher_config": TEACHER, "divergence": "jsd", "lmbda": 0.5,
                                                            "on_policy_max_new_tokens": 6}, steps=6,
                                                  accelerator="gpu", precision="bf16-mixed"))])
    module = cli.model
    assert module.teacher.device.type == "cuda"
    assert module.teacher.config._attn_implementation == module.model.config._attn_implementation
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
