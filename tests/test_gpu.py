"""GPU checks (run with `pytest -m gpu` on a CUDA machine): the flash varlen attention path, the
precision and speed switches (torchao and Transformer Engine FP8, Liger, compile), FSDP2 and DeepSpeed."""

import json

import pytest
import torch

from esft.data.packing import collate_packed, collate_padded
from esft.data.tasks import get_task
from esft.data.tokenize import tokenize_records
from esft.losses import cross_entropy_sum, next_token_targets
from esft.models import build_model
from esft.models.attention import varlen_available

from conftest import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not varlen_available(), reason="needs CUDA and torch.nn.attention.varlen"),
]


def _logits_and_loss(model, batch, **extra):
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch.get("attention_mask"), use_cache=False, **extra)
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    keep = targets != -100
    return out.logits.float(), cross_entropy_sum(out.logits[keep], targets[keep]) / keep.sum()


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_varlen_packed_matches_padded_sdpa(tokenizer, family):
    torch.manual_seed(0)
    records = get_task("reverse_words").generate(4) + get_task("arithmetic").generate(4)
    examples = tokenize_records(records, tokenizer, max_length=256, train_on="all")[0]
    sdpa = build_model(tokenizer, model_config=TINY[family], dtype="bfloat16", attn_implementation="sdpa").cuda().eval()
    varlen = build_model(tokenizer, model_config=TINY[family], dtype="bfloat16", attn_implementation="esft_varlen").cuda().eval()
    varlen.load_state_dict(sdpa.state_dict())
    packed = collate_packed([examples[:3], examples[3:]], "flat")
    cu = packed["cu_seqlens"].cuda()
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed["max_seqlen"], max_length_k=packed["max_seqlen"])
    with torch.no_grad():
        logits_v, loss_v = _logits_and_loss(varlen, packed, **kw)
        _, loss_p = _logits_and_loss(sdpa, collate_padded([examples], tokenizer.pad_token_id))
        logits_s, loss_s = _logits_and_loss(sdpa, packed)
    torch.testing.assert_close(loss_v, loss_p, atol=2e-2, rtol=0)
    torch.testing.assert_close(loss_v, loss_s, atol=2e-2, rtol=0)
    torch.testing.assert_close(logits_v, logits_s, atol=5e-2, rtol=0)


def test_fit_on_gpu_through_the_cli(tmp_path):
    """`auto` attention resolves to varlen on CUDA; training, generation eval and export run."""
    import json

    from esft.cli import main
    from test_e2e import config

    cli = main(["fit", "--config", str(config(tmp_path, 12, accelerator="gpu")), "--trainer.precision", "bf16-mixed"])
    assert cli.model.model.config._attn_implementation == "esft_varlen"
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["steps"] == 12 and (tmp_path / "hf" / "model.safetensors").exists()


# ---- precision and speed switches (see README "Precision and speed switches") ----------------
def _fit(tmp_path, *args, steps=6, **data):
    from esft.cli import main
    from test_e2e import config

    cli = main(["fit", "--config", str(config(tmp_path, steps, accelerator="gpu", **data)), *args])
    from test_speed import train_losses

    losses = train_losses(tmp_path)
    assert cli.trainer.global_step == steps and all(torch.isfinite(torch.tensor(losses)))
    return cli, losses


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true"])
def test_precisions_on_gpu(tmp_path, precision):
    cli, losses = _fit(tmp_path, "--trainer.precision", precision)
    assert losses[-1] < losses[0]
    if precision == "16-mixed":  # fp16 autocast with loss scaling
        assert cli.trainer.precision_plugin.scaler is not None
    else:
        assert {p.dtype for p in cli.model.parameters()} == {torch.bfloat16}
    assert cli.model.model.config._attn_implementation == "esft_varlen"


def test_torchao_fp8_trains_on_gpu(tmp_path):
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    cli, losses = _fit(tmp_path, "--trainer.precision", "bf16-mixed", "--model.init_args.fp8", "tensorwise")
    assert cli.datamodule.pads_to_budget()  # on by default with fp8: token counts divisible by 16
    assert sum(isinstance(m, Float8Linear) for m in cli.model.modules()) == 14
    assert losses[-1] < losses[0]


def test_transformer_engine_fp8_trains_on_gpu(tmp_path):
    """A few steps through the `esft.precision.TransformerEngineFP8` plugin: every aligned Linear
    layer is a ``te.Linear`` (the LM head stays ``nn.Linear``), the loss is finite and falls."""
    te = pytest.importorskip("transformer_engine.pytorch",
                             reason="Transformer Engine is not installed: pip install transformer-engine[pytorch]")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Transformer Engine FP8 needs compute capability >= 8.9 (Ada, Hopper or newer)")
    from esft.cli import main
    from test_e2e import config
    from test_speed import train_losses, training_only

    plugins = [{"class_path": "esft.precision.TransformerEngineFP8",
                "init_args": {"recipe": {"fp8_format": "HYBRID", "amax_history_len": 16}}},
               {"class_path": "esft.checkpoint.AtomicCheckpointIO"}]
    # FP8 GEMMs need token counts divisible by 16: fixed-shape batches of max_tokens (256)
    cfg = training_only(config(tmp_path, 8, accelerator="gpu", pad_to_budget=True))
    cli = main(["fit", "--config", str(cfg), "--trainer.plugins", json.dumps(plugins)])
    losses = train_losses(tmp_path)
    assert cli.trainer.global_step == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    model = cli.model.model
    swapped = {n for n, m in model.named_modules() if isinstance(m, te.Linear)}
    assert len(swapped) == 2 * 7  # q k v o gate up down per layer
    assert {"model." + n for n in swapped} == set(cli.trainer.precision_plugin.converted)
    assert type(model.lm_head) is torch.nn.Linear
    assert [n for n, m in model.named_modules() if type(m) is torch.nn.Linear] == ["lm_head"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

def test_liger_loss_matches_chunked_loss(tokenizer):
    pytest.importorskip("liger_kernel")
    from esft.models.forward import token_loss

    torch.manual_seed(0)
    records = get_task("reverse_words").generate(6) + get_task("arithmetic").generate(6)
    examples = tokenize_records(records, tokenizer, max_length=256, train_on="all")[0]
    model = build_model(tokenizer, model_config=TINY["llama"], dtype="bfloat16", attn_implementation="sdpa").cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed([examples], "flat").items()}
    results = {}
    for impl in ("chunked", "liger"):
        model.zero_grad()
        loss, n = token_loss(model, batch, 64, impl)
        (loss / n).backward()
        results[impl] = (loss / n, model.lm_head.weight.grad.float().clone(), n)
    (a, ga, na), (b, gb, nb) = results["chunked"], results["liger"]
    assert na == nb
    torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=0)
    assert (gb - ga).norm() / ga.norm() < 2e-2


def test_compile_with_varlen_on_gpu(tmp_path):
    """compile + budget padding + flash varlen: training compiles once."""
    from test_speed import GraphCount

    torch._dynamo.reset()
    count = {"class_path": "test_speed.GraphCount"}
    cli, _ = _fit(tmp_path, "--trainer.precision", "bf16-mixed", "--model.init_args.compile", "true",
                  steps=4, extra_callbacks=[count])
    graphs = next(c for c in cli.trainer.callbacks if isinstance(c, GraphCount)).graphs
    assert len(set(graphs)) == 1


@pytest.mark.parametrize("fp8", [None, "tensorwise"], ids=["bf16", "torchao-fp8"])
def test_fsdp2_one_process_wiring_on_gpu(tmp_path, fp8):
    """FSDP2 (ModelParallelStrategy) on one GPU with compile after sharding and the varlen path,
    and torchao FP8 layers converted before sharding: trains, exports."""
    from torch.distributed.fsdp import FSDPModule

    extra = []
    if fp8 is not None:
        pytest.importorskip("torchao.float8")
        extra = ["--model.init_args.fp8", fp8]
    strategy = ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": '
                '{"data_parallel_size": 1, "tensor_parallel_size": 1, "save_distributed_checkpoint": false}}')
    cli, losses = _fit(tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.strategy", strategy,
                       "--model.init_args.compile", "true", *extra)
    assert isinstance(cli.model.model, FSDPModule) and losses[-1] < losses[0]
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_process_wiring_on_gpu(tmp_path, stage):
    """Lightning's DeepSpeedStrategy on one GPU (ZeRO-3 partitioning every parameter): trains with
    the chunked loss outside the LM head's forward, generates, exports whole weights."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    strategy = json.dumps({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"config": config}})
    cli, losses = _fit(tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.strategy", strategy)
    assert losses[-1] < losses[0]
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    config = cli.model.model.config
    assert exported["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
