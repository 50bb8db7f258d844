"""Precision and speed switches on CPU: trainer precisions through the CLI, FP8 layer selection
(Transformer Engine and torchao), the Liger loss's error paths, fixed-shape batches for
torch.compile, and (slow) a compiled run against the eager one."""

import json
import sys
import types

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from esft.cli import main
from esft.data import SFTDataModule
from esft.data.packing import best_fit_decreasing, collate_fixed, collate_packed, max_segments
from esft.data.tasks import get_task
from esft.data.tokenize import tokenize_records
from esft.models import build_model
from esft.models.forward import liger_cross_entropy, token_loss
from esft.objectives import SFTModule
from esft.precision import TransformerEngineFP8, fp8_linear_names, require_fp8_gpu

from conftest import TINY
from test_e2e import config, first_loss

# intermediate_size 136 is not a multiple of 16: the MLP projections stay out of FP8
ODD_MLP = {**TINY["llama"], "intermediate_size": 136}
ATTN = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]


def train_losses(root) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(root)).Reload().Scalars("train/loss")]


def training_only(path):
    """`config` without the evaluation, export and checkpoint callbacks and validation (fast)."""
    cfg = yaml.safe_load(path.read_text())
    keep = ("TokenThroughput",)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    cfg["trainer"].update(enable_checkpointing=False, limit_val_batches=0)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precision_from_the_cli_trains(tmp_path, precision):
    cli = main(["fit", "--config", str(training_only(config(tmp_path, 6))), "--trainer.precision", precision])
    losses = train_losses(tmp_path)
    assert cli.trainer.global_step == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    dtypes = {p.dtype for p in cli.model.parameters()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})


# ---- FP8 layer selection ---------------------------------------------------------------------
def test_fp8_layer_selection_leaves_out_the_head_odd_dims_and_skipped_names(tokenizer):
    model = build_model(tokenizer, model_config=ODD_MLP)
    assert fp8_linear_names(model) == ATTN
    assert fp8_linear_names(model, skip=["o_proj"]) == [n for n in ATTN if not n.endswith("o_proj")]
    aligned = build_model(tokenizer, model_config=TINY["llama"])
    names = fp8_linear_names(aligned)
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer
    # the LM head is found through a LightningModule too
    module = SFTModule(model_config=ODD_MLP)
    assert fp8_linear_names(module) == ["model." + n for n in ATTN]


def test_transformer_engine_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install transformer-engine\[pytorch\]"):
        TransformerEngineFP8()


def test_transformer_engine_from_yaml_without_the_package_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    plugins = [{"class_path": "esft.precision.TransformerEngineFP8", "init_args": {"recipe": {"fp8_format": "HYBRID"}}},
               {"class_path": "esft.checkpoint.AtomicCheckpointIO"}]
    with pytest.raises((SystemExit, ValueError)) as e:  # jsonargparse exits, or raises when debugging
        main(["fit", "--config", str(config(tmp_path, 2)), "--trainer.plugins", json.dumps(plugins)])
    assert "pip install transformer-engine[pytorch]" in str(e.value) + capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_fp8_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        require_fp8_gpu("Transformer Engine FP8")


def test_torchao_fp8_converts_only_eligible_layers():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    module = SFTModule(model_config=ODD_MLP, fp8="tensorwise", fp8_skip=["layers.1.self_attn.o_proj"])
    converted = {n for n, m in module.model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == set(ATTN) - {"model.layers.1.self_attn.o_proj"}
    assert type(module.model.lm_head) is nn.Linear and type(module.model.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(SFTModule(model_config=TINY["llama"], fp8="rowwise").model.lm_head) is nn.Linear


def test_torchao_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ModuleNotFoundError, match="pip install torchao"):
        SFTModule(model_config=TINY["llama"], fp8="tensorwise")


# ---- Liger -----------------------------------------------------------------------------------
def _liger_inputs():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


def test_liger_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    with pytest.raises(ModuleNotFoundError, match="pip install liger-kernel"):
        liger_cross_entropy(*_liger_inputs())


def test_liger_on_cpu_says_it_needs_cuda(monkeypatch, tokenizer):
    fake = types.ModuleType("liger_kernel.transformers.functional")
    fake.liger_fused_linear_cross_entropy = lambda *a, **k: pytest.fail("must not be called on CPU")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    with pytest.raises(RuntimeError, match="CUDA only"):
        liger_cross_entropy(*_liger_inputs())
    model = build_model(tokenizer, model_config=TINY["llama"], attn_implementation="sdpa")
    batch = collate_packed([_examples(tokenizer)[:3]])
    with pytest.raises(RuntimeError, match="loss_impl='chunked'"):
        token_loss(model, batch, impl="liger")


# ---- fixed shapes for torch.compile ----------------------------------------------------------
def _examples(tokenizer, n=12):
    records = get_task("reverse_words").generate(n // 2) + get_task("arithmetic").generate(n - n // 2)
    return tokenize_records(records, tokenizer, max_length=64, train_on="all")[0]


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_budget_padded_batches_have_one_shape_and_the_same_loss(tokenizer, layout):
    torch.manual_seed(0)
    examples = _examples(tokenizer, 24)
    units = best_fit_decreasing([e["length"] for e in examples], 64)
    per_batch, budget = 3, 192
    segments = max_segments(units, per_batch, budget, 64)
    model = build_model(tokenizer, model_config=TINY["llama"], attn_implementation="sdpa").eval()
    shapes = set()
    for lo in range(0, len(units), per_batch):
        rows = [[examples[i] for i in u] for u in units[lo : lo + per_batch]]
        fixed = collate_fixed(rows, layout, budget, 64, segments)
        plain = collate_packed(rows, layout)
        shapes.add((tuple(fixed["input_ids"].shape), tuple(fixed["cu_seqlens"].shape), fixed["max_seqlen"]))
        assert fixed["num_tokens"] == plain["num_tokens"]
        assert fixed["cu_seqlens"][-1] == fixed["input_ids"].numel()
        with torch.no_grad():
            (a, n), (b, m) = token_loss(model, fixed, 16), token_loss(model, plain, 16)
        assert n == m
        torch.testing.assert_close(a / n, b / m, atol=1e-5, rtol=0)
    expected = (1, budget) if layout == "flat" else (budget // 64, 64)
    assert shapes == {(expected, (segments + 1,), 64)}


def test_datamodule_pads_to_budget(tokenizer):
    dm = SFTDataModule(num_train_per_task=24, num_val_per_task=0, max_length=64, max_tokens=256,
                       layout="flat", pad_to_budget=True)
    dm.setup("fit")
    shapes = {(tuple(b["input_ids"].shape), tuple(b["cu_seqlens"].shape), b["max_seqlen"]) for b in dm.train_dataloader()}
    assert len(shapes) == 1 and next(iter(shapes))[0] == (1, 256)


class GraphCount(L.Callback):
    """Records how many graphs torch.compile has made after each training step."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        import torch._dynamo.utils

        self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow
def test_compiled_training_matches_eager_first_loss(tmp_path):
    """compile (budget padding on by default with it): the run completes and its first loss is
    the eager one on the same padded batches."""
    torch._dynamo.reset()
    losses = {}
    for name, args in (("eager", dict(pad_to_budget=True)), ("compiled", {})):
        root = tmp_path / name
        count = {"class_path": "test_speed.GraphCount"}
        cli = main(["fit", "--config", str(config(root, 4, extra_callbacks=[count], **args)),
                    "--model.init_args.compile", str(name == "compiled")])
        assert cli.trainer.global_step == 4 and cli.datamodule.pads_to_budget()
        losses[name] = first_loss(root)
    graphs = next(c for c in cli.trainer.callbacks if isinstance(c, GraphCount)).graphs
    assert len(graphs) == 4 and len(set(graphs)) == 1  # compiled at step 1, never again
    assert abs(losses["compiled"] - losses["eager"]) < 1e-3
