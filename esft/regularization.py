"""Regularization applied to the model itself: a dropout override and NEFTune embedding noise.

Both are switched on from `esft.optim.OptimConfig` (``model.init_args.optim.dropout`` and
``model.init_args.optim.neftune_alpha``); `CausalLMModule` calls `apply_regularization` once
after building the model. Label smoothing is a loss option (`esft.losses.ce`), and weight
decay an optimizer one (`esft.optim`).

    esft fit --config configs/sft/regularized.yaml

**Dropout override.** transformers models read their dropout probabilities from config fields
(``attention_dropout``, ``hidden_dropout``, ``resid_pdrop``, ...) when the modules are built and
keep them as module attributes or `nn.Dropout` layers. `set_dropout` sets every such config field,
every `nn.Dropout`, and every float module attribute named like one of those fields, so the
override reaches an already-built (or pretrained) model of any family.

**NEFTune** (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): in
training, uniform noise ``U(-1, 1) * alpha / sqrt(L * d)`` is added to the input embeddings
(``d`` the hidden size, ``L`` the sequence length); evaluation and generation see clean
embeddings. Departure: the paper's ``L`` is the length of the (padded) training sequence. A
packed row here holds many documents, so ``L`` is the length of the document each token belongs
to (from the ``position_ids`` that restart at 0 per document; the unpadded length of the row in a
padded batch). A document then gets the noise it would get if trained on its own, however it is
packed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_DROPOUT_FIELD = re.compile(r"(dropout|pdrop)(_prob|_rate)?$")


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its sub-configs (text_config and the like)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    out = [config]
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            out.append(value)
    return out


def set_dropout(model: nn.Module, p: float) -> list[str]:
    """Set every dropout probability of `model` to `p`; returns what was set (for the log).

    Raises ValueError when the model has no dropout anywhere, so an override never silently does
    nothing.
    """
    changed, fields = [], set()
    for config in _configs(model):
        for key, value in config.to_dict().items():
            if _DROPOUT_FIELD.search(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(config, key, p)
                fields.add(key)
                changed.append(f"config.{key}")
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            changed.append(f"{name}.p")
            continue
        for key, value in vars(module).items():
            if key in fields and isinstance(value, float):
                setattr(module, key, p)
                changed.append(f"{name}.{key}")
    if not changed:
        raise ValueError(f"model.init_args.optim.dropout: {type(model).__name__} has no dropout "
                         "(no config field named *dropout / *pdrop and no nn.Dropout module)")
    return changed


def document_lengths(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Length of the document each token belongs to, ``[B, T]`` from ``position_ids [B, T]``.

    Documents start where the position restarts at 0 (and at the start of every row). With a 2-D
    `attention_mask` (padded, unpacked batches) each row is one document of ``mask.sum()`` tokens.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.sum(1, keepdim=True).clamp(min=1).expand_as(attention_mask)
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.reshape(-1).long().cumsum(0) - 1
    lengths = torch.bincount(segment)
    return lengths[segment].view_as(position_ids)


def neftune_noise(embeds: torch.Tensor, lengths: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune noise for ``embeds [B, T, d]``: ``U(-1, 1) * alpha / sqrt(L * d)`` with ``L = lengths [B, T]``."""
    scale = alpha / torch.sqrt(lengths.to(torch.float32) * embeds.shape[-1])
    noise = torch.rand(embeds.shape, generator=generator, device=embeds.device, dtype=torch.float32) * 2 - 1
    return (noise * scale.unsqueeze(-1)).to(embeds.dtype)


class NEFTune:
    """A forward pre-hook on the decoder that, in training, swaps ``input_ids`` for noisy
    ``inputs_embeds``. It sees the forward's keyword arguments, so the document lengths come from
    the batch's ``position_ids`` (see the module docstring)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not module.training or self.alpha <= 0:
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids, args = args[0], args[1:]
        if input_ids is None:
            return None  # already given embeddings: leave them
        embeds = module.get_input_embeddings()(input_ids)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        lengths = document_lengths(position_ids, kwargs.get("attention_mask"))
        kwargs = {**kwargs, "input_ids": None, "inputs_embeds": embeds + neftune_noise(embeds, lengths, self.alpha)}
        return args, kwargs


def add_neftune(model: nn.Module, alpha: float):
    """Register NEFTune on `model`'s decoder; returns the hook handle (``.remove()`` undoes it)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder.register_forward_pre_hook(NEFTune(alpha), with_kwargs=True)


def apply_regularization(model: nn.Module, dropout: float | None, neftune_alpha: float) -> None:
    """The model-side switches of `OptimConfig`: dropout override and NEFTune."""
    if dropout is not None:
        set_dropout(model, dropout)
    if neftune_alpha > 0:
        add_neftune(model, neftune_alpha)
