"""Padding-free packing: best-fit-decreasing bins, collators, and a resumable batch sampler.

A packed micro-batch is one row of concatenated documents, ``[1, total_tokens]``, with
`position_ids` restarting at 0 for every document and `cu_seqlens` marking the boundaries.
Attention keeps documents apart: transformers' SDPA / flex / eager paths build a block-diagonal
causal mask from the restarting `position_ids` (training forwards must pass ``use_cache=False``,
see NOTES), and the varlen path consumes `cu_seqlens` directly. The loss masks the
next-token targets that would cross a boundary (`esft.losses.next_token_targets`).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from esft.data.tokenize import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= `capacity` (best-fit decreasing).

    Items are placed longest first, each into the open bin with the least room that still fits
    it. The open bins' free room is kept sorted, so each placement is a binary search:
    O(n log n) comparisons. Output is deterministic for the same input.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has length {size} > bin capacity {capacity}")
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= size
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def collate_packed(examples: Sequence[dict[str, Any]], pad_to: int | None = None) -> dict[str, Any]:
    """Concatenate examples into one padding-free row.

    `pad_to` (optional) appends a filler document of -100 labels up to a fixed length, for
    fixed-shape steps (torch.compile); it is counted in ``num_padding``.
    """
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    positions = [p for e in examples for p in range(len(e["input_ids"]))]
    lengths = [len(e["input_ids"]) for e in examples]
    num_tokens = len(ids)
    if pad_to is not None and pad_to > num_tokens:
        filler = pad_to - num_tokens
        ids += [0] * filler
        labels += [IGNORE_INDEX] * filler
        positions += list(range(filler))
        lengths.append(filler)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
        "num_tokens": num_tokens,
        "num_padding": len(ids) - num_tokens,
    }


def collate_padded(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad examples into a ``[batch, longest]`` batch with an attention mask (unpacked baseline)."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[row, :k] = torch.tensor(e["input_ids"])
        labels[row, :k] = torch.tensor(e["labels"])
        attention_mask[row, :k] = 1
    num_tokens = int(attention_mask.sum())
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "num_tokens": num_tokens,
        "num_padding": n * width - num_tokens,
    }


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields fixed batches (lists of example indices) in a per-epoch shuffled order.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so it is the same in a
    resumed run. `resume(epoch, batches_done)` makes the next iteration of that epoch skip the
    batches that were already trained on; Lightning calls `set_epoch` at every epoch start.
    Each rank takes every ``num_replicas``-th batch of the permutation.
    """

    def __init__(
        self,
        batches: list[list[int]],
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.batches = batches
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self._skip = (epoch, batches_done)

    def __len__(self) -> int:
        return len(self.batches) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        order = order[self.rank : len(self) * self.num_replicas : self.num_replicas]
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip = self._skip[1]
        self._skip = None
        for b in order[skip:]:
            yield self.batches[b]
