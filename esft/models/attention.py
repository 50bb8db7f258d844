"""Attention paths for packed (padding-free) batches.

- ``sdpa`` / ``eager`` / ``flex_attention``: transformers builds a block-diagonal causal mask
  from `position_ids` that restart at 0 per document (portable; O(T^2) mask memory).
- ``esft_varlen``: `torch.nn.attention.varlen.varlen_attn` (flash varlen) on CUDA, driven by
  `cu_seqlens`; no mask is built at all. On CPU the same path runs SDPA's causal kernel once per
  document of the flat row (any dtype): its cost follows the documents (the sum of their squared
  lengths), where a ``rows`` batch under ``sdpa`` pays the square of the row width.

``auto`` picks ``esft_varlen`` on CUDA when torch has it and activations are 16-bit (flash
kernels take bf16/fp16 only), else ``sdpa``; on CPU ``esft_varlen`` is chosen by name.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttnImplementation = Literal["auto", "sdpa", "eager", "flex_attention", "esft_varlen", "flash_attention_2"]
VARLEN = "esft_varlen"
# paths whose cost follows the documents, not the row: packed batches go to them as one flat row
FLAT_PACKING = {VARLEN, "flex_attention", "flash_attention_2", "flash_attention_3"}


def packed_layout(attn_implementation: str | None) -> Literal["flat", "rows"]:
    """The packed-batch layout (`esft.data.packing.collate_packed`) that suits an attention path:
    ``flat`` where its cost follows the documents, ``rows`` where a mask costs O(width^2)."""
    return "flat" if attn_implementation in FLAT_PACKING else "rows"


def varlen_available() -> bool:
    """Flash varlen (CUDA) is available."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface over `varlen_attn`; query/key/value ``[1, heads, T, D]``."""
    from torch.nn.attention.varlen import varlen_attn

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or query.shape[0] != 1:
        raise ValueError("esft_varlen attention needs a packed batch [1, T] with cu_seq_lens_q/k")
    if not query.is_cuda:
        return _per_document_attention(module, query, key, value, cu_q, scaling), None
    if torch.is_autocast_enabled(query.device.type):  # RoPE may have promoted q/k to fp32
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"esft_varlen (flash) attention needs bf16/fp16 activations, got {query.dtype}: "
            "use dtype bfloat16, trainer precision bf16-mixed, or attn_implementation sdpa"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    if k.shape[1] != q.shape[1]:  # GQA: torch 2.11's varlen_attn has no enable_gqa
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    window = getattr(module, "sliding_window", None)
    out = varlen_attn(
        q, k, v, cu_q, cu_k, kwargs["max_length_q"], kwargs["max_length_k"],
        scale=scaling, window_size=(window - 1 if window else -1, 0),
    )
    return out.unsqueeze(0), None  # [1, T, heads, D]


def _per_document_attention(module, query, key, value, cu_seqlens: torch.Tensor, scaling=None) -> torch.Tensor:
    """Causal SDPA on each document ``cu_seqlens[i]:cu_seqlens[i+1]`` of a flat ``[1, heads, T, D]``
    row (the CPU form of ``esft_varlen``); returns ``[1, T, heads, D]``."""
    if getattr(module, "sliding_window", None):
        raise ValueError("esft_varlen on CPU has no sliding window: use attn_implementation sdpa for this model")
    gqa = key.shape[1] != query.shape[1]
    lengths = cu_seqlens.diff().tolist()
    # split, not slices: the backward of a split is one concatenation, that of each slice a
    # zero-filled tensor of the whole row
    out = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa) if n else q
           for q, k, v, n in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), lengths)]
    return torch.cat(out, dim=2).transpose(1, 2)


def register_varlen() -> None:
    """Register ``esft_varlen`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)


def resolve_attn_implementation(name: str, device: torch.device | None = None, half: bool = False) -> str:
    """The attention path for `name`; `half` says activations are bf16/fp16."""
    if name == "auto":
        on_cuda = device is not None and device.type == "cuda"
        name = VARLEN if on_cuda and half and varlen_available() else "sdpa"
    if name == VARLEN:
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and not varlen_available():
            raise RuntimeError("attn_implementation='esft_varlen' on CUDA needs torch.nn.attention.varlen (torch >= 2.9)")
        register_varlen()
    return name
