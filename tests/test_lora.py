"""LoRA as a model option of every objective: only the adapters train, the export is merged."""

import pytest
import torch
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
    adapter = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()  # adds it to `base`
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=1e-4, rtol=0)
