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
