"""Padding-free packing: best-fit-decreasing rows, collators, and a resumable batch sampler.

Examples are packed best-fit-decreasing into rows of at most ``max_length`` tokens; a
micro-batch is a random draw of rows, laid out ``flat`` (all documents in one row) or as
``rows`` (see `collate_packed`), with `position_ids` restarting at 0 for every document and
`cu_seqlens` marking the boundaries.
Attention keeps documents apart: transformers' SDPA / flex / eager paths build a block-diagonal
causal mask from the restarting `position_ids` (with transformers 5 only when the forward has no
cache, so training forwards pass ``use_cache=False``: `esft.models.forward.forward_kwargs`), and
the varlen path consumes `cu_seqlens` directly. The loss masks the next-token targets that would
cross a boundary (`esft.losses.next_token_targets`).
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from esft.data.tokenize import IGNORE_INDEX

Layout = Literal["flat", "rows"]
Collate = Callable[[Sequence[Sequence[dict[str, Any]]]], dict[str, Any]]  # a micro-batch's rows -> tensors


@dataclass(frozen=True)
class PackingNeeds:
    """What a model asks of packed micro-batches: the objective states it once through
    `esft.data.SFTDataModule.connect`, so the data never reads the model. The defaults are what a
    DataModule without a connection uses."""

    layout: Layout = "rows"
    """``flat`` (all documents in one row, kept apart by ``cu_seqlens``) for attention whose cost
    follows the documents (varlen, flash, flex); ``rows`` where a block mask costs O(width^2)."""
    static_shapes: bool = False
    """Every micro-batch the same shape (a compiled model compiles once; FP8 matmuls see token
    counts divisible by 16 when the budget is)."""


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= `capacity` (best-fit decreasing).

    Items are placed longest first (ties by index), each into the open bin with the least room
    that still fits it, the lowest-numbered such bin on a tie; the output is deterministic. The
    open bins are kept in buckets by their room, and the rooms that have open bins in a sorted
    list of at most `capacity` values: a placement is one binary search over that list and one
    heap operation, whatever the number of open bins (a million examples pack in seconds).
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.size and int(sizes.max()) > capacity:
        i = int(np.argmax(sizes > capacity))
        raise ValueError(f"item {i} has length {int(sizes[i])} > bin capacity {capacity}")
    order = np.lexsort((np.arange(sizes.size), -sizes)).tolist()  # longest first, then by index
    sizes = sizes.tolist()
    bins: list[list[int]] = []
    rooms: list[int] = []  # the distinct rooms that open bins have, sorted
    open_bins: dict[int, list[int]] = {}  # room -> heap of the ids of the bins with that room
    for i in order:
        size = sizes[i]
        k = bisect.bisect_left(rooms, size)
        if k == len(rooms):
            b, room = len(bins), capacity - size
            bins.append([i])
        else:
            room = rooms[k]
            heap = open_bins[room]
            b = heapq.heappop(heap)
            if not heap:
                del open_bins[room], rooms[k]
            bins[b].append(i)
            room -= size
        if room > 0:
            if room not in open_bins:
                open_bins[room] = []
                bisect.insort(rooms, room)
            heapq.heappush(open_bins[room], b)
    return bins


def example_lengths(examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """Token counts of `examples` (an `esft.data.store.ExampleStore` answers from its index)."""
    if hasattr(examples, "lengths"):
        return examples.lengths
    return np.fromiter((e["length"] for e in examples), dtype=np.int64, count=len(examples))


def example_trained_tokens(examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """`trained_tokens` of every example (a store answers from its index)."""
    if hasattr(examples, "trained_tokens"):
        return examples.trained_tokens
    return np.fromiter((trained_tokens(e) for e in examples), dtype=np.int64, count=len(examples))


def causal_pairs(lengths: Sequence[int]) -> int:
    """(query, key) pairs causal attention computes over real documents: sum of s(s+1)/2.
    Fillers and padding are left out (model FLOPs count real work only; see `esft.flops`)."""
    return sum(s * (s + 1) // 2 for s in lengths)


def collate_packed(
    rows: Sequence[Sequence[dict[str, Any]]],
    layout: Layout = "flat",
    pad_to: int | None = None,
    max_filler: int | None = None,
) -> dict[str, Any]:
    """Collate packed rows (each a list of examples) without padding between documents.

    ``flat`` puts every document in one row, ``[1, total_tokens]``: no padding at all; the
    layout for attention kernels that skip cross-document work (flash varlen, flex).
    ``rows`` keeps one row per packed row, ``[rows, longest_row]``, and ends shorter rows with a
    filler document: the layout for SDPA / eager, whose block-diagonal mask costs O(width^2).
    `pad_to` widens the result to a fixed width (fixed shapes for torch.compile). Filler tokens
    have -100 labels and their own restarting positions, and are counted in ``num_padding``;
    `max_filler` splits a longer filler into documents of at most that many tokens.
    """
    segments = [[e for row in rows for e in row]] if layout == "flat" else [list(row) for row in rows]
    width = max(max(sum(e["length"] for e in seg) for seg in segments), pad_to or 0)
    ids, labels, positions, lengths = [], [], [], []
    for seg in segments:
        for e in seg:
            ids += e["input_ids"]
            labels += e["labels"]
            positions += range(e["length"])
            lengths.append(e["length"])
        filler = width - sum(e["length"] for e in seg)
        while filler > 0:
            piece = min(filler, max_filler or filler)
            ids += [0] * piece
            labels += [IGNORE_INDEX] * piece
            positions += range(piece)
            lengths.append(piece)
            filler -= piece
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    real = [e["length"] for seg in segments for e in seg]
    num_tokens = sum(real)
    shape = (len(segments), width)
    return {
        "input_ids": torch.tensor(ids).view(shape),
        "labels": torch.tensor(labels).view(shape),
        "position_ids": torch.tensor(positions).view(shape),
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
        "num_tokens": num_tokens,
        "num_padding": shape[0] * shape[1] - num_tokens,
        "num_causal_pairs": causal_pairs(real),
    }


def max_segments(units: Sequence[Sequence[int]], rows_per_batch: int, max_tokens: int, max_length: int) -> int:
    """An upper bound on the documents (fillers included) of any micro-batch of `collate_fixed`:
    the `rows_per_batch` fullest rows, plus one filler per row, plus the flat layout's fillers."""
    counts = sorted((len(u) for u in units), reverse=True)[:rows_per_batch]
    return sum(counts) + rows_per_batch + -(-max_tokens // max_length)


def collate_fixed(
    rows: Sequence[Sequence[dict[str, Any]]],
    layout: Layout,
    max_tokens: int,
    max_length: int,
    num_segments: int,
) -> dict[str, Any]:
    """`collate_packed` padded to the budget, so that every micro-batch has the same shapes and
    Python ints (torch.compile recompiles on a change): ``flat`` is ``[1, max_tokens]``; ``rows``
    is ``[max_tokens // max_length, max_length]``, with missing rows all filler. Filler documents
    are at most `max_length` long, `max_seqlen` is always `max_length`, and `cu_seqlens` has
    ``num_segments + 1`` entries (the last boundary repeated: empty documents).
    """
    if layout == "flat":
        batch = collate_packed(rows, "flat", pad_to=max_tokens, max_filler=max_length)
    else:
        n = max_tokens // max_length
        if len(rows) > n:
            raise ValueError(f"{len(rows)} rows do not fit a budget of {n} rows")
        batch = collate_packed(list(rows) + [[]] * (n - len(rows)), "rows", pad_to=max_length)
    cu = batch["cu_seqlens"]
    if cu.numel() > num_segments + 1:
        raise ValueError(f"{cu.numel() - 1} documents exceed num_segments={num_segments}")
    batch["cu_seqlens"] = torch.cat([cu, cu[-1:].expand(num_segments + 1 - cu.numel())])
    batch["max_seqlen"] = max_length
    return batch


def collate_padded(rows: Sequence[Sequence[dict[str, Any]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad every example to the longest, ``[examples, longest]``, with an attention mask
    (the unpacked baseline). Takes the same list-of-rows input as `collate_packed`."""
    examples = [e for row in rows for e in row]
    width = max(e["length"] for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, e in enumerate(examples):
        k = e["length"]
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
        "num_causal_pairs": causal_pairs([e["length"] for e in examples]),
    }


class PackedRows(Dataset):
    """Item ``i`` is the list of examples of unit ``i`` (a packed row, or a single example)."""

    def __init__(self, examples: Sequence[dict[str, Any]], units: list[list[int]]) -> None:
        self.examples = examples
        self.units = units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.examples[j] for j in self.units[i]]

    def __getitems__(self, batch: list[int]) -> "MicroBatch":
        """The rows of a micro-batch, keeping its `MicroBatch` fields for the collator."""
        rows = MicroBatch(self[i] for i in batch)
        rows.step_tokens = getattr(batch, "step_tokens", None)
        rows.source = getattr(batch, "source", None)
        return rows


def with_step_tokens(rows: Sequence[Sequence[dict[str, Any]]], collate: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``collate(rows)`` plus ``step_tokens`` (the trained tokens of the micro-batch's optimizer
    step, see `ResumableBatchSampler`) and ``source`` (the mixture source of all its documents)
    where the rows carry them."""
    batch = collate(rows)
    if getattr(rows, "step_tokens", None) is not None:
        batch["step_tokens"] = rows.step_tokens
    if getattr(rows, "source", None) is not None:
        batch["source"] = rows.source
    return batch


def trained_tokens(example: dict[str, Any]) -> int:
    """Next-token targets an example trains on: its labels after the first that are not -100
    (the loss predicts token t + 1 from position t, within the document)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


class EpochOrder(Sampler[int]):
    """The unit ids of one epoch: a permutation seeded by ``(seed, epoch)``, or ``0..n-1`` in
    order. It is the batch sampler's ``.sampler``, where Lightning calls `set_epoch` at the start
    of every epoch (Lightning looks for ``set_epoch`` on ``dataloader.sampler`` and on
    ``dataloader.batch_sampler.sampler``, not on the batch sampler itself)."""

    def __init__(self, num_units: int, shuffle: bool = True, seed: int = 0) -> None:
        self.num_units = num_units
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_units

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.num_units))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return iter(order)


class MicroBatch(list):
    """The unit ids of one micro-batch, carrying ``step_tokens``: the trained tokens of the whole
    optimizer step it belongs to (all its micro-batches, all ranks), or None where unknown; and
    ``source``: the group (mixture source) all its units belong to, where the sampler has groups."""

    step_tokens: int | None = None
    source: str | None = None


class ResumableBatchSampler(Sampler[list[int]]):
    """Groups units (packed rows, or single examples) into micro-batches, reshuffled every epoch.

    Each epoch takes the order of `sampler` (`EpochOrder`: a permutation seeded by ``(seed,
    epoch)``) and makes every `units_per_batch` consecutive units a micro-batch, so batches mix
    lengths and tasks instead of repeating the length-sorted groups that bin packing produces, and
    the order is the same in a resumed run. `resume(epoch, batches_done)` makes the next iteration
    of that epoch skip the batches already trained on. Rank ``r`` of ``num_replicas`` takes every
    ``num_replicas``-th micro-batch.

    With `unit_tokens` (trained tokens per unit), each yielded `MicroBatch` carries the trained
    tokens of its optimizer step: `accumulate` consecutive micro-batches of every rank, the last
    step of an epoch being shorter (Lightning steps at the end of every epoch). The loss divides by
    it, so a step's gradient is the mean over all of its trained tokens.

    `groups` (``(name, number of units)`` for consecutive runs of units, without shuffling) keeps
    every micro-batch inside one group and names it in `MicroBatch.source`: per-source
    validation of a mixture.
    """

    def __init__(
        self,
        num_units: int,
        units_per_batch: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        unit_tokens: Sequence[int] | None = None,
        accumulate: int = 1,
        groups: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        if unit_tokens is not None and len(unit_tokens) != num_units:
            raise ValueError(f"unit_tokens has {len(unit_tokens)} entries for {num_units} units")
        if groups is not None and (shuffle or sum(n for _, n in groups) != num_units):
            raise ValueError(f"groups must cover the {num_units} units in order, without shuffling")
        self.groups = groups
        self.sampler = EpochOrder(num_units, shuffle, seed)
        self.units_per_batch = units_per_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.unit_tokens = unit_tokens
        self.accumulate = max(1, accumulate)
        self._skip: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        """Units per micro-batch (what `DataLoader.batch_sampler.batch_size` reports elsewhere;
        Lightning's DeepSpeed strategy reads it for DeepSpeed's micro-batch size)."""
        return self.units_per_batch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        self._skip = (epoch, batches_done)

    def __len__(self) -> int:
        return self._num_batches() // self.num_replicas

    def _num_batches(self) -> int:
        k = self.units_per_batch
        return sum(-(-n // k) for _, n in self.groups) if self.groups else -(-len(self.sampler) // k)

    def _batches(self, order: list[int]) -> list[MicroBatch]:
        """`order` cut into micro-batches of `units_per_batch` units (within each group)."""
        k = self.units_per_batch
        if not self.groups:
            return [MicroBatch(order[lo : lo + k]) for lo in range(0, len(order), k)]
        batches, start = [], 0
        for name, n in self.groups:
            for lo in range(start, start + n, k):
                batch = MicroBatch(order[lo : min(lo + k, start + n)])
                batch.source = name
                batches.append(batch)
            start += n
        return batches

    def _step_tokens(self, batches: list[list[int]]) -> list[int]:
        """Trained tokens of the optimizer step of each of this rank's micro-batches."""
        n, world, acc = len(self), self.num_replicas, self.accumulate
        per_batch = [sum(self.unit_tokens[u] for u in b) for b in batches[: n * world]]
        # micro-batch k of rank r is batches[k * world + r]; step s holds k in [s * acc, (s + 1) * acc)
        per_step = [sum(per_batch[k * world : min(k + acc, n) * world]) for k in range(0, n, acc)]
        return [per_step[k // acc] for k in range(n)]

    def __iter__(self) -> Iterator[MicroBatch]:
        batches = self._batches(list(self.sampler))
        mine = batches[self.rank : len(self) * self.num_replicas : self.num_replicas]
        if self.unit_tokens is not None:
            for batch, tokens in zip(mine, self._step_tokens(batches)):
                batch.step_tokens = tokens
        skip = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        self._skip = None
        yield from mine[skip:]


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableBatchSampler` whose position Lightning saves in checkpoints
    and restores on resume (Lightning treats a loader with ``state_dict`` / ``load_state_dict`` as
    resumable): the epoch, and the micro-batches of it already trained on. The position comes
    from `progress` (the trainer's counters), not from batches fetched, since Lightning fetches
    ahead of the batch it trains on."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.progress()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batch_sampler.resume(state_dict["epoch"], state_dict["batches_done"])
