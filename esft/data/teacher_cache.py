"""Offline teacher cache: the teacher's top-k next-token log-probabilities for every trained token
of a dataset, computed once and stored in one safetensors file, so that students train without
the teacher in memory.

    esft distill-data topk --config configs/distill/cached.yaml --teacher runs/distill_teacher/hf \\
        --k 64 --out runs/distill_data/teacher_top64.safetensors

File layout (tensors): ``ids`` int32 ``[tokens, k]`` and ``logprobs`` ``[tokens, k]`` (float32 or
float16), one row per trained token in example order and, within an example, position order;
``offsets`` int64 ``[examples + 1]`` (example i owns rows ``offsets[i]:offsets[i+1]``);
``fingerprints`` int64 ``[examples]`` (a hash of each example's ids and labels). Metadata: ``k``,
``temperature``, ``vocab_size``, ``teacher``. The data module checks the fingerprints against its
tokenized examples, so a cache built from other data (tasks, seed, tokenizer, max_length) is an
error rather than silent nonsense. The loss on these rows is `esft.losses.kd.topk_kd_divergence`
(it documents how the tail mass outside the top k is handled).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from esft.data.packing import collate_packed
from esft.losses.ce import IGNORE_INDEX, next_token_targets, trained_positions
from esft.models.attention import packed_layout
from esft.models.forward import forward_kwargs, plain_head


def fingerprint(example: dict[str, Any]) -> int:
    """A 63-bit hash of an example's input ids and labels."""
    data = array("q", list(example["input_ids"]) + list(example["labels"])).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file so that a killed process leaves either the whole file or none."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def num_targets(example: dict[str, Any]) -> int:
    """Trained next-token targets of one example (what the loss sees for it in any packed batch)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


class TeacherCache:
    """A cache file, loaded into memory; `gather` returns the rows of some examples, in order."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"teacher cache {path} not found; build it with `esft distill-data topk`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        missing = {"ids", "logprobs", "offsets", "fingerprints"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: not a teacher cache (missing tensors {sorted(missing)})")
        self.path = path
        self.ids, self.logprobs = tensors["ids"], tensors["logprobs"]
        self.offsets, self.fingerprints = tensors["offsets"], tensors["fingerprints"]
        self.k = int(meta.get("k", self.ids.shape[1]))
        self.temperature = float(meta.get("temperature", 1.0))
        self.vocab_size = int(meta.get("vocab_size", 0))
        self.teacher = meta.get("teacher", "?")

    def __len__(self) -> int:
        return len(self.fingerprints)

    def check(self, examples: Sequence[dict[str, Any]]) -> None:
        """Raise ValueError unless the cache was built from exactly these tokenized examples."""
        if len(examples) != len(self):
            raise ValueError(f"teacher cache {self.path} holds {len(self)} examples, the training data has {len(examples)}: "
                             "rebuild it with the same data options (esft distill-data topk)")
        for i, e in enumerate(examples):
            if fingerprint(e) != int(self.fingerprints[i]):
                raise ValueError(f"teacher cache {self.path} does not match training example {i} (another dataset, "
                                 "seed, tokenizer or max_length?): rebuild it with `esft distill-data topk`")

    def gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N, k], logprobs [N, k])`` of the given examples, concatenated in order."""
        rows = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        sel = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return self.ids[sel], self.logprobs[sel]


def collate_with_teacher_cache(rows: Sequence[Sequence[dict[str, Any]]], collate, cache: TeacherCache) -> dict[str, Any]:
    """`collate(rows)` plus ``teacher_topk_ids`` / ``teacher_topk_logprobs`` for every trained token,
    when every example carries a ``cache_index`` (training data); other batches pass through."""
    batch = collate(rows)
    indices = [e.get("cache_index") for row in rows for e in row]
    if indices and None not in indices:
        batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = cache.gather(indices)
    return batch


@torch.no_grad()
def teacher_topk(teacher: PreTrainedModel, batch: dict[str, Any], k: int, temperature: float = 1.0,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-`k` token ids (int32) and log-probs (fp32) at `temperature` for every
    trained token of a packed `batch`, ``[N, k]`` each, in `trained_positions` order."""
    head = teacher.get_output_embeddings()
    hidden = teacher.get_decoder()(**forward_kwargs(teacher, batch)).last_hidden_state
    hidden = trained_positions(hidden, next_token_targets(batch["labels"], batch["position_ids"]))[0]
    ids, logprobs = [], []
    for lo in range(0, hidden.shape[0], chunk_size):
        logits = F.linear(hidden[lo : lo + chunk_size], head.weight, head.bias).float()
        values, top = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        ids.append(top.to(torch.int32))
        logprobs.append(values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(logprobs)


@torch.no_grad()
def write_teacher_cache(
    teacher: PreTrainedModel,
    examples: Sequence[dict[str, Any]],
    path: str | Path,
    k: int = 64,
    temperature: float = 1.0,
    max_tokens: int = 8192,
    dtype: torch.dtype = torch.float32,
    teacher_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run `teacher` over `examples` (consecutive groups of at most `max_tokens` tokens) and write
    its top-`k` log-probs at `temperature` for every trained token to `path`. Returns a summary."""
    if not plain_head(teacher):
        raise ValueError("the teacher cache needs a plain linear LM head; this teacher transforms its logits")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the teacher's vocabulary), got {k}")
    device = next(teacher.parameters()).device
    layout = packed_layout(teacher.config._attn_implementation)
    groups, group, size = [], [], 0
    for e in examples:
        if group and size + e["length"] > max_tokens:
            groups.append(group)
            group, size = [], 0
        group.append(e)
        size += e["length"]
    if group:
        groups.append(group)
    ids_out, lp_out = [], []
    for group in tqdm(groups, desc="teacher top-k", disable=not progress, leave=False):
        batch = collate_packed([[e] for e in group] if layout == "rows" else [group], layout)
        top, values = teacher_topk(teacher, move_data_to_device(batch, device), k, temperature)
        if len(top) != sum(num_targets(e) for e in group):
            raise RuntimeError("trained-token count of a teacher batch differs from its examples'")
        ids_out.append(top.cpu())
        lp_out.append(values.to(dtype).cpu())
    counts = torch.tensor([num_targets(e) for e in examples], dtype=torch.int64)
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    tensors = {
        "ids": torch.cat(ids_out) if ids_out else torch.zeros(0, k, dtype=torch.int32),
        "logprobs": torch.cat(lp_out) if lp_out else torch.zeros(0, k, dtype=dtype),
        "offsets": offsets,
        "fingerprints": torch.tensor([fingerprint(e) for e in examples], dtype=torch.int64),
    }
    meta = {"k": str(k), "temperature": str(temperature), "vocab_size": str(vocab), "teacher": teacher_name}
    path = save_atomic(tensors, path, meta)
    return {"examples": len(examples), "tokens": int(offsets[-1]), "k": k, "bytes": path.stat().st_size}
