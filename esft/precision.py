"""FP8 training switches: which Linear layers may run in FP8, Transformer Engine as a Lightning
precision plugin, and torchao's float8 training conversion.

Both FP8 paths convert the same layers (`fp8_linear_names`): every ``nn.Linear`` whose in and out
features are multiples of 16 (the FP8 GEMMs' alignment), except the LM head and any module whose
name contains one of the `skip` substrings. The LM head stays in high precision: its logits feed
the loss directly, and with tied embeddings its weight is also the input embedding.

Transformer Engine, from YAML (keep the atomic checkpoint plugin when replacing the list)::

    trainer:
      plugins:
        - class_path: esft.precision.TransformerEngineFP8
          init_args: {recipe: {fp8_format: HYBRID, amax_history_len: 16}}
        - class_path: esft.checkpoint.AtomicCheckpointIO

torchao is a model option instead: ``model.init_args.fp8: tensorwise`` (see `convert_torchao_fp8`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.plugins import TransformerEnginePrecision
from torch import nn

Float8Recipe = Literal["tensorwise", "rowwise"]
WeightsDType = Literal["bfloat16", "float16", "float32"]
ALIGN = 16


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head of `model` or of the first submodule that has one (a LightningModule's ``model``)."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            head = get()
            if head is not None:
                return head
    return None


def fp8_linear_names(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules of `model` that an FP8 conversion should replace.

    Kept out: the LM head (`output_head`), layers with in or out features not divisible by 16,
    and modules whose qualified name contains any of the `skip` substrings.
    """
    head = output_head(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if module.in_features % ALIGN or module.out_features % ALIGN:
            continue
        if any(s in name for s in skip):
            continue
        names.append(name)
    return names


def require_fp8_gpu(what: str) -> None:
    """Raise unless a CUDA device with FP8 tensor cores (compute capability >= 8.9) is present."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU with FP8 support (compute capability >= 8.9: Ada, Hopper or newer)")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"{what} needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
            f"{torch.cuda.get_device_name()} has {major}.{minor}. Use precision bf16-mixed instead."
        )


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise ModuleNotFoundError(
            "Transformer Engine FP8 needs the transformer_engine package: pip install transformer-engine[pytorch]"
        ) from e
    return te


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_to_te_linear(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Replace the eligible Linear layers (`fp8_linear_names`) with ``te.Linear``, copying weights.

    Returns the converted names. ``te.Linear`` is not an ``nn.Linear`` subclass.
    """
    te = _import_te()
    names = fp8_linear_names(model, skip)
    for name in names:
        old = model.get_submodule(name)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        _replace(model, name, new)
    return names


class TransformerEngineFP8(TransformerEnginePrecision):
    """Lightning's Transformer Engine precision with esft's layer selection.

    Lightning's own ``replace_layers`` converts every aligned Linear, the LM head included; this
    plugin converts the layers of `fp8_linear_names` itself and leaves the rest (and LayerNorm /
    RMSNorm) as they are. Needs ``pip install transformer-engine[pytorch]`` and an FP8 GPU
    (compute capability >= 8.9).
    """

    def __init__(
        self,
        weights_dtype: WeightsDType = "bfloat16",
        recipe: Mapping[str, Any] | None = None,
        skip: list[str] | None = None,
        fallback_compute_dtype: WeightsDType | None = None,
    ) -> None:
        """
        Args:
            weights_dtype: dtype the whole model is cast to.
            recipe: ``transformer_engine.common.recipe.DelayedScaling`` fields, e.g.
                ``{fp8_format: HYBRID, amax_history_len: 16, amax_compute_algo: max}``.
            skip: module-name substrings kept out of FP8 (the LM head always is).
            fallback_compute_dtype: autocast dtype of the operations that do not run in FP8.
        """
        _import_te()
        require_fp8_gpu("Transformer Engine FP8")
        super().__init__(
            weights_dtype=getattr(torch, weights_dtype),
            recipe=recipe,
            replace_layers=False,
            fallback_compute_dtype=getattr(torch, fallback_compute_dtype) if fallback_compute_dtype else None,
        )
        self.skip = list(skip or [])
        self.converted: list[str] = []

    def convert_module(self, module: nn.Module) -> nn.Module:
        if not any("transformer_engine.pytorch" in type(m).__module__ for m in module.modules()):
            self.converted = convert_to_te_linear(module, self.skip)
        return super().convert_module(module)


def convert_torchao_fp8(model: nn.Module, recipe: Float8Recipe, skip: Sequence[str] = ()) -> list[str]:
    """Swap the eligible Linear layers (`fp8_linear_names`) for torchao ``Float8Linear`` in place.

    ``tensorwise`` scales each tensor once (fastest); ``rowwise`` scales per row (more accurate,
    needs compute capability >= 9.0 for its kernels). Conversion itself runs anywhere; the FP8
    matmuls need an FP8 GPU, and are fast only under ``torch.compile``. Returns the converted names.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ModuleNotFoundError("fp8 (torchao float8 training) needs torchao: pip install torchao (or esft[fp8])") from e
    names = set(fp8_linear_names(model, skip))
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=lambda _m, fqn: fqn in names
    )
    return sorted(names)
