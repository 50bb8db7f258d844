"""LoRA through `peft` as a model option of every objective (``model.init_args.lora`` in YAML).

    model:
      init_args:
        model_name_or_path: Qwen/Qwen2.5-7B
        lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear, use_dora: false, use_rslora: false}
        # QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the frozen base in 4 bits (CUDA + bitsandbytes)
        # lora: {r: 16, alpha: 32, quantize: nf4}

The base weights are frozen and only the low-rank factors train. The HF export merges them
(`merged_copy`), so ``<run>/hf`` stays a plain transformers checkpoint, and also writes the adapter
alone in peft's format to ``<run>/hf/adapter`` (`ExportHF`), loadable on the base model with
``PeftModel.from_pretrained(base, "<run>/hf/adapter")``.

With ``quantize`` the base is loaded through bitsandbytes in 4 bits (NF4 or FP4 blocks, bf16
compute, `quantization_config`) and prepared for training with peft's
``prepare_model_for_kbit_training`` (norms, embeddings and the LM head kept in fp32). The merged
export dequantizes the base weights to the dtype they were loaded in and adds the update there:
re-quantizing ``W + BA`` to 4 bits would round the update away (it is far smaller than a 4-bit
step), so the export is a plain unquantized checkpoint; quantize it again at load time if wanted.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from esft.extras import require

Quantize = Literal["nf4", "fp4"]


@dataclass
class LoraOptions:
    """LoRA adapters on the model's linear layers (Hu et al. 2021, arXiv 2106.09685)."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "all-linear"
    """Module-name suffixes to adapt, or ``all-linear`` (every linear layer but the LM head)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv 2402.09353): the update is split into a magnitude and a direction."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    quantize: Quantize | None = None
    """QLoRA: load the frozen base in 4 bits (``nf4`` as in the paper, or ``fp4``) through
    bitsandbytes, computing in bf16; CUDA only, pretrained weights only (``model_name_or_path``)."""


def lora_options(opts: LoraOptions | dict | None) -> LoraOptions | None:
    """`opts` as `LoraOptions` (a checkpoint's hyperparameters hold them as a plain mapping)."""
    return opts if opts is None or isinstance(opts, LoraOptions) else LoraOptions(**opts)


def quantization_config(opts: LoraOptions | None):
    """The transformers ``BitsAndBytesConfig`` that loads the base of a QLoRA run in 4 bits, or
    None without ``quantize``. Raises where QLoRA cannot run: no CUDA device, no bitsandbytes."""
    if opts is None or opts.quantize is None:
        return None
    option = f"model.init_args.lora.quantize={opts.quantize!r} (QLoRA, a 4-bit base through bitsandbytes)"
    if not torch.cuda.is_available():
        raise RuntimeError(f"{option} needs a CUDA device and bitsandbytes, and no CUDA device is available: "
                           "run it on a GPU (pip install 'esft[qlora]'), or drop 'quantize' for LoRA on a full-precision base")
    require("bitsandbytes", "qlora", option)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quantize, bnb_4bit_compute_dtype=torch.bfloat16)


def quantized_load_device() -> torch.device:
    """Where a 4-bit base is loaded (bitsandbytes quantizes the weights as they arrive on the
    GPU): this process's GPU, by the launcher's ``LOCAL_RANK`` (0 when there is none)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` (a transformers model, or one wrapped by peft) holds 4- or 8-bit weights."""
    return any(getattr(model, flag, False) for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"))


def apply_lora(model: nn.Module, opts: LoraOptions | dict, gradient_checkpointing: bool = False) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters; only the adapters require gradients. A
    quantized base (`quantization_config`) is first prepared for k-bit training."""
    peft = require("peft", "lora", "LoRA (model.init_args.lora)")
    opts = lora_options(opts)
    if opts.r <= 0:
        raise ValueError(f"lora.r must be positive, got {opts.r}")
    if is_quantized(model):
        # the module's own `gradient_checkpointing` option already set checkpointing up (non-reentrant)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    # a reward model (`esft.models.build_model(head="score")`): peft trains its new scalar head in full
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    config = peft.LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                             target_modules=opts.target_modules, use_dora=opts.use_dora, use_rslora=opts.use_rslora,
                             task_type=task)
    return peft.get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merged_copy(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain transformers model with the LoRA updates of `model` merged in; `model` is not changed.

    The weights are `model`'s own, or `state`: its full state dict gathered from shards (FSDP2,
    ``get_model_state_dict``), whose adapted base weights are then merged into in place. A 4-bit
    (QLoRA) base is dequantized first. The copy is an unsharded, unquantized twin of `model`
    built on the meta device (no memory, no random init) that takes the tensors over, and peft
    merges it: DoRA, rsLoRA and a reward model's trained head come out as in peft's own merge.
    Tensors the merge does not touch are shared with `model` (or `state`)."""
    twin = _plain_twin(model)
    if state is None:
        state = _plain_state(model, twin.state_dict().keys())
    try:
        twin.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"the LoRA model's weights do not fit its unsharded twin, so they cannot be merged: {e}") from None
    for name, buffer in list(twin.named_buffers()):  # not in a state dict (rotary frequencies): taken from `model`
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            source = model.get_buffer(name)
            twin.get_submodule(owner).register_buffer(attr, source.to(next(iter(state.values())).device), persistent=False)
    return twin.merge_and_unload()


def _plain_twin(model: nn.Module) -> nn.Module:
    """A peft model on the meta device with `model`'s architecture and adapter, unsharded and
    unquantized: the base class is the transformers one (FSDP2 swaps in a subclass), the
    config drops the quantization settings (the export must not claim to be quantized)."""
    peft = require("peft", "lora", "LoRA (model.init_args.lora)")
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model()
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    config = copy.deepcopy(base.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    with torch.device("meta"):
        return peft.get_peft_model(cls(config), copy.deepcopy(model.peft_config[model.active_adapter]))


def _plain_state(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    """`model`'s tensors under `keys` (its unquantized state-dict names), quantized base weights
    dequantized, and the base weights that the merge adds an update to copied (so that the
    merge leaves `model` as it is)."""
    from peft.utils.integrations import dequantize_module_weight

    state = {}
    for key in keys:
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        tensor = getattr(module, attr)
        if attr == "weight" and owner.endswith(".base_layer"):
            tensor = dequantize_module_weight(module)
            tensor = tensor.detach().clone() if tensor is module.weight else tensor.detach()
        state[key] = tensor.detach()
    return state
