"""Preference training: pair data (formats, errors, built-in pairs), per-document log-probs on
packed pair batches, the frozen reference, and DPO end to end through the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from esft.cli import main
from esft.data import PreferenceDataModule
from esft.data.records import DataFormatError
from esft.data.preference import task_pairs, to_pair
from esft.data.tasks import get_task
from esft.models.forward import target_logprobs
from esft.objectives import PreferenceModule

from conftest import TINY

BUILTIN = {"tasks": [{"name": "arithmetic", "max_digits": 2}], "num_train_per_task": 12, "num_val_per_task": 0,
           "max_length": 32, "max_tokens": 128}


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rows_as_strings_message_lists_and_binarised_conversations():
    user = {"role": "user", "content": "Hi?"}
    plain = to_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    assert plain["history"] == [user] and plain["chosen"] == [{"role": "assistant", "content": "Hello."}]
    # the binarised feedback layout: chosen / rejected repeat the prompt, with or without a prompt field
    conv = lambda text: [user, {"role": "assistant", "content": text}]  # noqa: E731
    for row in ({"prompt": "Hi?", "chosen": conv("Hello."), "rejected": conv("Go away.")},
                {"chosen": conv("Hello."), "rejected": conv("Go away.")}):
        assert to_pair(row) == plain
    # a conversation with a shared history: the earlier assistant turn is context
    history = [user, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    pair = to_pair({"prompt": history, "chosen": "4", "rejected": "5", "system": "Be brief."})
    assert pair["history"] == [{"role": "system", "content": "Be brief."}, *history]
    assert to_pair({"chosen": history + [{"role": "assistant", "content": "4"}],
                    "rejected": history + [{"role": "assistant", "content": "5"}]})["history"] == history


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    cases = [({"prompt": "Hi?", "chosen": "Hello."}, "'rejected' is missing"),
             ({"prompt": "Hi?", "chosen": "", "rejected": "No."}, "'chosen' is empty"),
             ({"prompt": "Hi?", "chosen": 3, "rejected": "No."}, "'chosen' must be a string or a list of turns, got int"),
             ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."},
              "'chosen' must continue the prompt with an assistant turn"),
             ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role"),
             ("{not json", "malformed JSON")]
    for i, (bad, message) in enumerate(cases):
        path = write_rows(tmp_path / f"bad{i}.jsonl", [good, good, bad])
        dm = PreferenceDataModule(path=str(path), max_length=32, max_tokens=64)
        with pytest.raises(DataFormatError, match=rf"bad{i}\.jsonl:3: .*") as e:
            dm.setup("fit")
        assert message in str(e.value)
    dm = PreferenceDataModule(path=str(tmp_path / "bad0.jsonl"), on_bad_record="skip", max_length=32, max_tokens=64)
    dm.setup("fit")
    assert len(dm.train_examples) == 4 and dm.data_report["sources"][0]["skipped"] == 1


def test_pair_files_take_the_validation_split_and_extra_paths(tmp_path):
    """Pairs go through `SFTDataModule`'s records stage: `val_fraction` holds out the pairs of the
    shared seeded split, `extra_paths` add pairs; predict has no SFT records to generate for."""
    from esft.data.datamodule import held_out

    rows = [{"prompt": f"Hi {i}?", "chosen": "Hello.", "rejected": "Go away."} for i in range(10)]
    extra = [{"prompt": f"Bye {i}?", "chosen": "Bye.", "rejected": "No."} for i in range(3)]
    dm = PreferenceDataModule(path=str(write_rows(tmp_path / "a.jsonl", rows)), val_fraction=0.2, seed=3,
                              extra_paths=[str(write_rows(tmp_path / "b.jsonl", extra))], max_length=32, max_tokens=64)
    dm.setup("fit")
    assert len(dm.train_examples) == 2 * (8 + 3) and len(dm.val_examples) == 2 * 2
    assert {p["history"][0]["content"] for p in dm.val_records} == {rows[i]["prompt"] for i in held_out(10, 0.2, 3)[1]}
    with pytest.raises(ValueError, match="holds preference pairs"):
        dm.predict_dataloader()


def test_builtin_pairs_are_verified_right_and_wrong():
    task = get_task("arithmetic", max_digits=2)
    for edits in (1, 2):
        pairs = task_pairs({"name": "arithmetic", "max_digits": 2}, 40, 0, "train", num_edits=edits)
        for p in pairs:
            record = {"answer": p["chosen"][0]["content"]}
            assert task.score(record, p["chosen"][0]["content"]) == 1.0
            assert task.score(record, p["rejected"][0]["content"]) == 0.0
        changed = [sum(a != b for a, b in zip(p["chosen"][0]["content"], p["rejected"][0]["content"])) for p in pairs]
        assert max(changed) == edits and min(changed) >= 1


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_pair_logprobs_of_a_packed_batch_equal_each_document_alone(layout):
    """`document_logprobs` + `doc_index` on a packed pair batch (rows layout: with fillers) give
    every document's completion log-prob as computed on the document alone, chosen then rejected."""
    dm = PreferenceDataModule(**BUILTIN, layout=layout)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=8, loss_type="simpo")
    sums, counts = module._pair_logps(lambda fn, *a: fn(module.model, *a), batch)
    assert batch["step_tokens"] == sums.shape[0] >= 2  # pairs, not tokens
    by_ids = {tuple(e["input_ids"]): e for e in dm.train_examples}
    ids, positions = batch["input_ids"].reshape(-1), batch["position_ids"].reshape(-1)
    starts = [int(s) for s in batch["cu_seqlens"][:-1][batch["doc_index"]]]
    for k, start in enumerate(starts):
        length = next(e["length"] for key, e in by_ids.items() if key == tuple(ids[start:start + len(key)].tolist()))
        doc = {"input_ids": ids[start:start + length][None], "position_ids": positions[start:start + length][None],
               "labels": torch.tensor(by_ids[tuple(ids[start:start + length].tolist())]["labels"])[None]}
        logp, _, targets = target_logprobs(module.model, doc, chunk_size=0)
        torch.testing.assert_close(sums.reshape(-1)[k], logp.sum(), atol=1e-4, rtol=1e-5)
        assert counts.reshape(-1)[k] == (targets != -100).sum()
    examples = dm.train_examples  # chosen and rejected of a pair share the prompt, differ in completion
    assert examples[0]["input_ids"] != examples[1]["input_ids"] and examples[0]["labels"][:5] == examples[1]["labels"][:5]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_each_loss_type_trains_and_only_dpo_ipo_hold_a_reference(loss_type):
    dm = PreferenceDataModule(**BUILTIN, layout="rows")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, loss_type=loss_type, beta=0.5)
    module.configure_model()
    losses, stats = module.pair_terms(batch)
    assert (module.reference is None) == (loss_type in ("simpo", "orpo"))
    assert losses.shape == stats["accuracy"].shape and torch.isfinite(losses).all()
    if loss_type in ("sigmoid", "ipo"):  # policy == reference at the start: no reward, no KL
        assert stats["rewards/margins"].abs().max() < 1e-5 and stats["kl"].abs().max() < 1e-5
    losses.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    if module.reference is not None:
        assert all(p.grad is None for p in module.reference.model.parameters())
        assert not {id(p) for p in module.reference.model.parameters()} & {id(p) for p in module.parameters()}


def test_lora_reference_is_the_base_model():
    dm = PreferenceDataModule(**BUILTIN, layout="flat")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    plain = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16)
    torch.manual_seed(0)
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, lora={"r": 4})
    module.configure_model()
    assert module.reference.base_of_adapter  # no copy of the model
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapters move the policy away from the base
    base = plain._pair_logps(lambda fn, *a: fn(plain.model, *a), batch)[0]
    ref = module._pair_logps(module.reference, batch)[0]
    policy = module._pair_logps(lambda fn, *a: fn(module.model, *a), batch)[0]
    torch.testing.assert_close(ref, base)
    assert (policy - base).abs().max() > 1e-2
    assert module.model.training  # the reference ran in eval mode, the policy is back in train mode


def dpo_config(root: Path, steps: int) -> Path:
    """Held-out pairs whose chosen answers end in '.' and rejected ones in '!' (the same number):
    a preference a tiny random model can learn in a few steps, and that generalises."""
    for name, n, seed in (("train", 96, 0), ("val", 24, 1)):
        rows = []
        for i in range(n):
            a, b = (i * 37 + seed * 11) % 100, (i * 53 + seed * 7) % 100
            rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b}!"})
        write_rows(root / f"{name}.jsonl", rows)
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "log_every_n_steps": 1,
                    "val_check_interval": steps, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root), "name": "", "version": ""}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "esft.objectives.PreferenceModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 64, "beta": 0.5,
                                "optim": {"lr": 1e-2, "warmup_steps": 0}}},
        "data": {"class_path": "esft.data.PreferenceDataModule",
                 "init_args": {"path": str(root / "train.jsonl"), "val_path": str(root / "val.jsonl"),
                               "max_length": 32, "max_tokens": 512}},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dpo_through_the_cli_raises_heldout_preference_accuracy(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = str(dpo_config(tmp_path, steps=6))
    before = float(main(["validate", "--config", cfg]).trainer.callback_metrics["val/accuracy"])
    cli = main(["fit", "--config", cfg])
    after = cli.trainer.callback_metrics
    assert before < 0.6 and float(after["val/accuracy"]) >= 0.9, (before, float(after["val/accuracy"]))
    assert after["val/rewards/margins"] > 0 and after["val/kl"] > 0
    acc = EventAccumulator(str(tmp_path)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
            "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected", "train/kl"} <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0]  # log 2 at the start
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])  # the reference is not saved
    assert len(ckpt["state_dict"]) == len(cli.model.model.state_dict())


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_precomputed_reference_gives_the_online_loss(layout):
    dm = PreferenceDataModule(**BUILTIN, layout=layout)
    dm.setup("fit")
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, beta=0.5, precompute_reference=True)
    module.configure_model()
    for p in module.model.parameters():  # the policy moves away from the reference
        p.data.add_(torch.randn_like(p) * 0.02)
    online = module.pair_terms(next(iter(dm.train_dataloader())))
    module.cache_reference_logps(dm.train_examples)
    batch = next(iter(dm.train_dataloader()))
    assert "ref_logps" in batch
    module.reference = None  # freed, as when fitting
    cached = module.pair_terms(batch)
    assert module.reference is None and online[1]["kl"].abs().max() > 1e-3
    torch.testing.assert_close(cached[0], online[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached[1]["kl"], online[1]["kl"], atol=1e-5, rtol=1e-5)


def test_dpo_with_an_expert_config_trains_only_the_selected_experts(tmp_path):
    config = tmp_path / "experts.json"
    config.write_text(json.dumps({"experts": {"0": [1], "1": [2]}}))
    dm = PreferenceDataModule(**BUILTIN, layout="rows")
    dm.setup("fit")
    module = PreferenceModule(model_config=TINY["qwen2_moe"], loss_chunk_size=16, beta=0.5, experts=str(config))
    module.configure_model()
    for p in module.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)  # away from the reference: DPO's gradient is 0 at the start
    module.pair_terms(next(iter(dm.train_dataloader())))[0].sum().backward()
    graded = {name for name, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == {f"model.layers.{i}.mlp.experts.esft_{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")}
    assert all(p.grad is None for p in module.reference.model.parameters())


def kto_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}." if i % 2 else f"{2 * i + 1}!",
             "label": bool(i % 2)} for i in range(n)]


def test_kto_rows_load_as_example_and_mismatched_document(tmp_path):
    path = write_rows(tmp_path / "kto.jsonl", kto_rows())
    dm = PreferenceDataModule(path=str(path), max_length=32, max_tokens=64, layout="flat")
    dm.setup("fit")
    examples, tok = dm.train_examples, dm.tokenizer
    assert dm.unpaired and len(examples) == 12
    for i in range(6):  # the example, then its prompt with the next example's completion
        own, kl = tok.decode(examples[2 * i]["input_ids"]), tok.decode(examples[2 * i + 1]["input_ids"])
        assert f"What is {i} + {i}?" in own and f"What is {i} + {i}?" in kl
        nxt = kto_rows()[(i + 1) % 6]["completion"]
        assert kto_rows()[i]["completion"] in own and nxt in kl and nxt not in own
    batch = next(iter(dm.train_dataloader()))
    first = [tok.decode(ex["input_ids"]) for ex in examples[::2]]
    order = [next(j for j, text in enumerate(first) if f"{2 * k if k % 2 else 2 * k + 1}" in text) for k in range(6)]
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].numel() == batch["doc_index"].numel() // 2
    assert order == list(range(6))
    cases = [({"prompt": "Hi?", "completion": "Yo."}, "field 'label' must be true (desirable) or false, got None"),
             ({"prompt": "Hi?", "completion": "Yo.", "label": "yes"}, "field 'label' must be true (desirable) or false"),
             ({"prompt": "Hi?", "label": True}, "field 'completion' is missing"),
             ({"prompt": "Hi?", "completion": 3, "label": True}, "'completion' must be a string or a list of turns"),
             ({"prompt": "Hi?", "chosen": "a", "rejected": "b"}, "a preference row among kto rows")]
    for i, (bad, message) in enumerate(cases):
        path = write_rows(tmp_path / f"bad{i}.jsonl", [*kto_rows(2), bad])
        with pytest.raises(DataFormatError, match=rf"bad{i}\.jsonl:3: .*") as e:
            PreferenceDataModule(path=str(path), max_length=32, max_tokens=64).setup("fit")
        assert message in str(e.value)


def test_kto_loss_through_the_module_equals_hand_values(tmp_path):
    """KTO in `PreferenceModule`: per example ``lambda (1 - sigmoid(beta (r - z0)))`` for desirable
    and ``lambda (1 - sigmoid(beta (z0 - r)))`` for undesirable ones, r the policy / reference
    log-ratio, z0 the batch mean log-ratio of the mismatched documents clamped at 0; computed here
    by hand from each document's log-probs under the two models."""
    import math

    path = write_rows(tmp_path / "kto.jsonl", kto_rows())
    dm = PreferenceDataModule(path=str(path), max_length=32, max_tokens=512, layout="flat")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    beta, wd, wu = 0.5, 1.3, 0.7
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, loss_type="kto", beta=beta,
                              desirable_weight=wd, undesirable_weight=wu)
    module.configure_model()
    torch.manual_seed(1)
    for p in module.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    losses, stats = module.pair_terms(batch)
    policy = module._pair_logps(lambda fn, *a: fn(module.model, *a), batch)[0].tolist()
    ref = module._pair_logps(module.reference, batch)[0].tolist()
    ratios = [[pol - r for pol, r in zip(pp, rr)] for pp, rr in zip(policy, ref)]
    z0 = max(0.0, sum(r[1] for r in ratios) / len(ratios))
    assert z0 > 0  # the perturbed policy moved the mismatched documents' log-probs up on average
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * (r[0] - z0))) if d else wu * (1 - sig(beta * (z0 - r[0])))
            for r, d in zip(ratios, batch["desirable"].tolist())]
    assert set(batch["desirable"].tolist()) == {True, False}
    torch.testing.assert_close(losses, torch.tensor(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["z0"], torch.full((6,), z0), atol=1e-5, rtol=1e-5)
    losses.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    with pytest.raises(ValueError, match="loss_type 'sigmoid' got KTO rows"):
        PreferenceModule(model_config=TINY["llama"], loss_type="sigmoid").pair_terms(batch)


def test_reference_cache_resumes_and_is_keyed_by_model_and_document(tmp_path):
    from esft.data.reference_cache import model_key, reference_logps
    from esft.models.forward import document_logprobs

    dm = PreferenceDataModule(**BUILTIN, layout="rows")
    dm.setup("fit")
    examples = dm.train_examples
    module = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, reference_cache=str(tmp_path / "ref"))
    module.configure_model()
    key, calls = model_key(module.reference.model), []

    def run(batch, fail_after=None):
        calls.append(batch["input_ids"].shape[0])
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # the pass is killed
        return module.reference(document_logprobs, batch, 16)[0]

    fresh = [dict(e) for e in examples]
    assert reference_logps(run, fresh, module.device) == len(examples)  # no cache: all computed
    start = len(calls)
    with pytest.raises(KeyboardInterrupt):  # killed after 3 batches of 2: one part of 4 written
        reference_logps(lambda b: run(b, fail_after=start + 3), [dict(e) for e in examples], module.device,
                        tmp_path / "ref", key, per_batch=2, part_size=4)
    resumed = [dict(e) for e in examples]
    assert reference_logps(run, resumed, module.device, tmp_path / "ref", key, part_size=4) == len(examples) - 4
    assert [e["ref_logp"] for e in resumed] == pytest.approx([e["ref_logp"] for e in fresh], abs=1e-5)
    again = [dict(e) for e in examples]
    assert reference_logps(run, again, module.device, tmp_path / "ref", key) == 0  # all from disk
    assert [e["ref_logp"] for e in again] == pytest.approx([e["ref_logp"] for e in fresh], abs=1e-5)
    assert reference_logps(run, [dict(e) for e in examples], module.device, tmp_path / "ref", "other") == len(examples)
    changed = [dict(e) for e in examples[:2]]
    first = next(i for i, label in enumerate(changed[0]["labels"]) if label != -100)
    changed[0]["labels"] = changed[0]["labels"][:first] + [-100] + changed[0]["labels"][first + 1:]  # another document
    assert reference_logps(run, changed, module.device, tmp_path / "ref", key) == 1
    # through the module: the files are keyed by the reference's weights
    module.cache_reference_logps([dict(e) for e in examples])
    torch.manual_seed(5)
    other = PreferenceModule(model_config=TINY["llama"], loss_chunk_size=16, reference_cache=str(tmp_path / "ref"))
    other.configure_model()
    assert model_key(other.reference.model) != key == model_key(module.reference.model)
    other.cache_reference_logps([dict(e) for e in examples])
    names = {p.name.split("-")[1] for p in (tmp_path / "ref").glob("ref-*.safetensors")}
    assert names == {key, "other", model_key(other.reference.model)}


def short_run(config: str, root: Path, steps: int, num_train: int, **init_args) -> Path:
    """`config` with `steps` optimizer steps, `num_train` records per task and its run under `root`
    (no TensorBoard, no generation evaluation); model init_args overridden by `init_args`."""
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["trainer"].update(max_steps=steps, val_check_interval=steps, default_root_dir=str(root), logger=False,
                          enable_progress_bar=False, num_sanity_val_steps=0)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"]
                                   if c["class_path"].rsplit(".", 1)[-1] in ("ExportHF", "TokenThroughput")]
    cfg["data"]["init_args"]["num_train_per_task"] = num_train
    cfg["model"]["init_args"].update(init_args)
    path = root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_dpo_tiny_config_from_an_sft_start_raises_heldout_accuracy(tmp_path):
    """configs/preference/dpo_tiny.yaml from a short run of configs/sft/quickstart.yaml (its SFT
    start): held-out preference accuracy (verified answer vs one perturbed character) rises."""
    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(short_run(str(root / "configs/sft/quickstart.yaml"), tmp_path / "sft", 300, 4000))])
    dpo = str(short_run(str(root / "configs/preference/dpo_tiny.yaml"), tmp_path / "dpo", 200, 1000,
                        model_name_or_path=str(tmp_path / "sft" / "hf")))
    before = float(main(["validate", "--config", dpo]).trainer.callback_metrics["val/accuracy"])
    after = main(["fit", "--config", dpo]).trainer.callback_metrics
    # measured 0.800 -> 0.840 on the 200 held-out pairs (one thread, 2026-12-01); 60 steps gave 0.815
    assert float(after["val/accuracy"]) >= before + 0.025, (before, float(after["val/accuracy"]))
    assert float(after["val/rewards/margins"]) > 0


def test_sampled_pairs_reject_the_models_wrong_answers(monkeypatch):
    from esft.commands import rejection_sample as rejection
    from esft.evaluation import Rollout

    turns = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    records = [{"task": "arithmetic", "answer": "5", "id": "a", "messages": turns("What is 2 + 3?", "5")},
               {"task": "arithmetic", "answer": "7", "id": "b", "messages": turns("What is 3 + 4?", "7")},
               {"task": "arithmetic", "answer": "9", "id": "c", "messages": turns("What is 4 + 5?", "9")}]
    # a: right, wrong, the same wrong up to whitespace, another wrong; b: wrong, cut off, wrong, wrong;
    # c: right three times and an empty turn (no pair)
    texts = ["5", "6", " 6 ", "4", "8", "7", "1", "2", "9", "9", "9", ""]
    truncated = [False] * 5 + [True] + [False] * 6

    def fake_rollout(model, tokenizer, conversations, max_new_tokens, batch_size, k, progress, **sampling):
        assert [c[-1]["role"] for c in conversations] == ["user"] * 3 and k == 4 and sampling["do_sample"]
        return [Rollout([1], [2], t, tr) for t, tr in zip(texts, truncated)]

    monkeypatch.setattr(rejection, "rollout", fake_rollout)
    rows, stats = rejection.preference_pairs(None, None, records, k=4, max_per_prompt=2, require_format=False)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [
        ("a-pair1", "5", "6"), ("a-pair2", "5", "4"),  # a correct sample chosen; the duplicate " 6 " skipped
        ("b-pair1", "7", "8"), ("b-pair2", "7", "1")]  # no untruncated correct sample: the reference answer
    assert rows[0]["prompt"] == records[0]["messages"][:1] and rows[0]["task"] == "arithmetic"
    assert stats["pairs"] == 4 and stats["prompts_paired"] == 2 and stats["chosen_from_reference"] == 2
    assert stats["duplicates"] == 3 and stats["truncated"] == 1 and stats["wrong"] == 6 and stats["correct"] == 4
    assert stats["empty"] == 1
    # a correct answer without the <think> format is not chosen when the format is required
    rows, _ = rejection.preference_pairs(None, None, records, k=4, max_per_prompt=1)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("5", "6"), ("7", "8")]
    assert all(r["chosen"] == r["answer"] for r in rows)
    with pytest.raises(ValueError, match="chosen must be"):
        rejection.preference_pairs(None, None, records, chosen="best")
    # a prompt file's record without a reference answer, and no correct sample: nothing to choose
    monkeypatch.setattr(rejection, "rollout", lambda *a, **kw: [Rollout([1], [2], "6", False)])
    with pytest.raises(ValueError, match="record 'q' has no reference answer"):
        rejection.preference_pairs(None, None, [{"task": "arithmetic", "answer": "5", "id": "q",
                                                 "messages": turns("What is 2 + 3?", "")[:1]}], k=1)


def test_sampled_pairs_file_trains_through_the_preference_data(tmp_path, tokenizer, monkeypatch):
    """`esft rejection-sample --pairs` on a model's own samples writes rows PreferenceDataModule reads,
    each rejected answer scored wrong and each chosen one right by the task's verifier."""
    import dataclasses

    from esft.commands import rejection_sample as rejection
    from esft.models import build_model

    real = rejection.rollout  # a random model never ends its turn: count its 4 tokens as finished answers
    monkeypatch.setattr(rejection, "rollout", lambda *a, **kw: [dataclasses.replace(o, truncated=False)
                                                                 for o in real(*a, **kw)])

    build_model(tokenizer, model_config=TINY["llama"], attn_implementation="sdpa").save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "pairs.jsonl"
    stats = rejection.main(["--pairs", "--no-format", "--model", str(tmp_path / "m"), "--task",
                            '{"name": "arithmetic", "max_digits": 1}', "--num-prompts", "6", "--k", "2",
                            "--max-new-tokens", "4", "--temperature", "1.0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["pairs"] == len(rows) > 0 and json.loads(Path(f"{out}.stats.json").read_text())["pairs"] == len(rows)
    task = get_task("arithmetic", max_digits=1)
    for r in rows:
        assert task.score(r, r["chosen"]) == 1.0 and task.score(r, r["rejected"]) < 1.0
    data = PreferenceDataModule(path=str(out), tokenizer_name=str(tmp_path / "m"), max_length=64, max_tokens=256)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].numel() > 0
