"""LoRA as a model option of every objective: only the adapters train, the export is merged;
QLoRA's 4-bit base (bitsandbytes, CUDA) and its dequantized merged export."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from esft.objectives import SFTModule

from conftest import TINY
from test_experts import _fit_config


def test_lora_trains_only_adapters_and_exports_merged_weights(tmp_path):
    from esft.cli import main

    module = SFTModule(model_config=TINY["qwen2_moe"], tokenizer="builtin")
    module.model.save_pretrained(tmp_path / "base")
    path = _fit_config(tmp_path, "qwen2_moe", tmp_path / "unused.json")
    text = path.read_text().replace(f"experts: {tmp_path / 'unused.json'}", "lora: {r: 4, alpha: 8.0}")
    path.write_text(text.replace("  - class_path: esft.experts.ExportExpertAdapter\n    init_args:\n"
                                 f"      dirpath: {tmp_path / 'adapter'}\n", ""))
    cli = main(["fit", "--config", str(path)])
    model = cli.model.model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert set(exported.state_dict()) == set(base.state_dict())  # a plain model: no adapter keys
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
        changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    # only the adapted linear layers moved: not norms, embeddings, routers or fused routed experts
    assert changed and not any(s in k for k in changed for s in ("norm", "embed", "mlp.gate.", "experts."))


def test_lora_and_experts_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'experts' and 'lora' cannot be combined"):
        SFTModule(model_config=TINY["qwen2_moe"], experts=str(tmp_path / "e.json"), lora={"r": 4})


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_the_adapter_is_exported_in_peft_format_beside_the_merged_model(tmp_path, variant):
    import copy

    import lightning as L
    from peft import PeftModel

    from esft.callbacks import ExportHF
    from esft.data import SFTDataModule

    module = SFTModule(model_config=TINY["llama"], lora={"r": 4, "alpha": 8.0, **variant}, loss_chunk_size=16,
                       optim={"lr": 5e-2, "warmup_steps": 0})
    config = module.model.peft_config["default"]
    assert (config.use_dora, config.use_rslora) == (variant.get("use_dora", False), variant.get("use_rslora", False))
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8.0 / 2 if variant.get("use_rslora") else 8.0 / 4)
    data = SFTDataModule(tasks=["reverse_words"], num_train_per_task=16, num_val_per_task=0, max_length=64, max_tokens=128)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ExportHF(str(tmp_path / "hf"))])
    trainer.fit(module, data)
    trained = module.model.eval()
    base = copy.deepcopy(trained).unload()  # the frozen base weights, without the adapter
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, base(ids).logits, atol=1e-4)  # the adapter moved
    saved = load_file(tmp_path / "hf" / "adapter" / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert bool(magnitudes) == variant.get("use_dora", False)  # DoRA's trained magnitudes travel with the adapter
    for key, magnitude in magnitudes.items():  # initialised to the base weight's row norms, then trained
        weight = base.get_submodule(key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]).weight
        assert not torch.allclose(magnitude, weight.norm(dim=1), atol=1e-4), key
    adapter = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()  # adds it to `base`
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=1e-4, rtol=0)


# ---- QLoRA ---------------------------------------------------------------------------------


@pytest.fixture
def base_dir(tmp_path):
    """A tiny pretrained llama on disk (QLoRA quantizes pretrained weights)."""
    torch.manual_seed(0)
    SFTModule(model_config=TINY["llama"], tokenizer="builtin").model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_qlora_without_cuda_is_a_clear_error(tmp_path, base_dir):
    from esft.cli import main

    with pytest.raises(RuntimeError, match=r"lora\.quantize='nf4' \(QLoRA.*needs a CUDA device and bitsandbytes.*esft\[qlora\]"):
        SFTModule(model_name_or_path=str(base_dir), tokenizer="builtin", lora={"r": 4, "quantize": "nf4"})
    # from a YAML config too: the option reaches the model through the CLI (jsonargparse re-raises
    # the model's error as a ValueError holding its message)
    path = _fit_config(tmp_path, "llama", tmp_path / "unused.json")
    path.write_text(path.read_text().replace(f"experts: {tmp_path / 'unused.json'}", "lora: {r: 4, quantize: nf4}"))
    with pytest.raises((RuntimeError, ValueError), match=r"lora\.quantize='nf4'.*needs a CUDA device"):
        main(["fit", "--config", str(path)])
    path.write_text(path.read_text().replace("quantize: nf4", "quantize: int4"))
    with pytest.raises(SystemExit):  # not a 4-bit type bitsandbytes has: refused when the config is parsed
        main(["fit", "--config", str(path)])


def test_qlora_loads_the_base_in_4_bits_with_bf16_compute(monkeypatch, tmp_path):
    """The options a QLoRA run gives transformers (here with CUDA and bitsandbytes faked: what is
    checked is what esft asks for, before anything is loaded)."""
    import sys
    import types

    from esft.models import build_model, load_tokenizer
    from esft.models.lora import LoraOptions, quantization_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install 'esft\[qlora\]'"):
        quantization_config(LoraOptions(quantize="nf4"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    assert quantization_config(LoraOptions()) is None and quantization_config(None) is None
    for kind in ("nf4", "fp4"):
        config = quantization_config(LoraOptions(quantize=kind))
        assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype) == (True, kind, torch.bfloat16)
    with pytest.raises(ValueError, match="needs pretrained weights"):
        build_model(load_tokenizer("builtin"), model_config=TINY["llama"], quantization_config=config)
    with pytest.raises(ValueError, match="'fp8' and 'lora.quantize' cannot be combined"):
        SFTModule(model_name_or_path=str(tmp_path), tokenizer="builtin", fp8="tensorwise", lora={"quantize": "nf4"})


def test_qlora_under_fsdp2_is_refused():
    from types import SimpleNamespace

    module = SFTModule(model_config=TINY["llama"], tokenizer="builtin")
    module.model.is_loaded_in_4bit = True  # as transformers marks a model loaded through bitsandbytes
    module._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 1)}  # what ModelParallelStrategy sets
    with pytest.raises(ValueError, match=r"lora\.quantize \(QLoRA\) is not supported under FSDP2"):
        module.configure_model()

def _load_4bit(path, device):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": device})


def _check_dequantized_merge(model, merged_state) -> None:
    """Every adapted weight of the export is the 4-bit base weight dequantized plus the LoRA update
    (peft's own merge into a 4-bit layer quantizes the sum again, and the update, far below a 4-bit
    step, is mostly rounded away), every other weight is the model's own."""
    from peft.utils.integrations import dequantize_module_weight

    adapted = {name.removeprefix("base_model.model.") + ".weight": layer for name, layer in model.named_modules()
               if hasattr(layer, "lora_A") and hasattr(layer, "base_layer")}
    assert adapted and all(type(layer.base_layer).__name__ == "Linear4bit" for layer in adapted.values())
    for key, layer in adapted.items():
        with torch.no_grad():
            expected = dequantize_module_weight(layer.base_layer).float() + layer.get_delta_weight("default").float()
        torch.testing.assert_close(merged_state[key].float().to(expected.device), expected, atol=1e-6, rtol=0, msg=key)
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(merged_state["model.embed_tokens.weight"].to(embed), embed, atol=0, rtol=0)


def test_the_merged_export_of_a_4bit_base_is_dequantized(base_dir, tmp_path):
    """On CPU where the installed bitsandbytes quantizes there (its CPU backend); QLoRA itself is
    a CUDA option (the GPU test below trains one)."""
    pytest.importorskip("bitsandbytes")
    from esft.models.lora import apply_lora, merged_copy

    try:
        quantized = _load_4bit(base_dir, "cpu")
    except Exception as e:  # older bitsandbytes: CUDA only
        pytest.skip(f"bitsandbytes does not quantize on this CPU: {e}")
    model = apply_lora(quantized, {"r": 4, "alpha": 8.0})
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter (B starts at zero)
            torch.nn.init.normal_(p, std=0.01)
    merged = merged_copy(model)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert exported.keys() == load_file(base_dir / "model.safetensors").keys()
    _check_dequantized_merge(model, exported)
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():  # the 4-bit model computes its base matmuls in bf16
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits,
                                   model(ids).logits, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_on_gpu_and_exports_the_adapter_and_a_dequantized_merged_model(base_dir, tmp_path):
    """``lora.quantize: nf4``: the base loads in 4 bits on the GPU, the adapters train through
    Lightning, and `ExportHF` writes the adapter (loadable on the 4-bit base with peft) and a plain
    merged model (no quantization config; the base weights dequantized, the update added)."""
    pytest.importorskip("bitsandbytes")
    import lightning as L
    from peft import PeftModel

    from esft.callbacks import ExportHF
    from esft.data import SFTDataModule

    module = SFTModule(model_name_or_path=str(base_dir), tokenizer="builtin", loss_chunk_size=16,
                       lora={"r": 4, "alpha": 8.0, "quantize": "nf4"}, optim={"lr": 5e-2, "warmup_steps": 0})
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cuda" and layer.weight.quant_type == "nf4"
    assert all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)
    data = SFTDataModule(tasks=["reverse_words"], num_train_per_task=16, num_val_per_task=0, max_length=64, max_tokens=128)
    trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[ExportHF(str(tmp_path / "hf"))])
    trainer.fit(module, data)
    trained = module.model.eval()
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # it trained
    assert "quantization_config" not in (tmp_path / "hf" / "config.json").read_text()
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == load_file(base_dir / "model.safetensors").keys()
    _check_dequantized_merge(trained, exported)
    ids = torch.randint(3, 500, (2, 24), device="cuda")
    adapter = PeftModel.from_pretrained(_load_4bit(base_dir, "cuda"), tmp_path / "hf" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").cuda().eval()
    with torch.no_grad():
        expected = trained(ids).logits.float()
        torch.testing.assert_close(adapter(ids).logits.float(), expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(merged(ids).logits.float(), expected, atol=2e-2, rtol=0)  # bf16 base matmuls
