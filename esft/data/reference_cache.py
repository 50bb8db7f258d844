"""Reference log-probs of preference documents, computed once (an offline pass) and cached on disk.

    esft fit --config configs/preference/dpo_tiny.yaml --model.reference_cache runs/dpo_tiny/reference

`PreferenceModule(precompute_reference=True)` runs the frozen reference over every training and
held-out document when fitting starts and then frees it; with ``reference_cache`` (a directory) the
pass reads what the cache already holds and writes what it computes, one part file per
``part_size`` documents, so a killed pass resumes where it stopped and later runs on the same data
skip it. Entries are keyed by the reference model (`model_key`: a hash of its weights, in the file
names) and by each document (`esft.data.teacher_cache.fingerprint`: its token ids and labels), so
a cache never serves another model, tokenizer, template or truncation. Part layout (safetensors):
``fingerprints`` int64 ``[n]``, ``logps`` float32 ``[n]`` (the summed completion log-prob).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from tqdm.auto import tqdm

from esft.data.packing import collate_packed
from esft.data.preference import pair_documents
from esft.data.teacher_cache import fingerprint, save_atomic


def model_key(model: torch.nn.Module, skip: str = "lora_") -> str:
    """16 hex digits hashing every tensor of `model`'s state dict (names, shapes, dtypes, values),
    LoRA adapters left out (the reference of a LoRA policy is its base). Sharded tensors (FSDP2
    DTensors) are gathered: every rank must call it."""
    digest = hashlib.blake2b(digest_size=8)
    for name, t in model.state_dict().items():
        if skip in name:
            continue
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_cache(directory: str | Path, key: str) -> dict[int, float]:
    """Every cached ``fingerprint -> log-prob`` of the reference `key` in `directory`."""
    from safetensors.torch import load_file

    found: dict[int, float] = {}
    for part in sorted(Path(directory).glob(f"ref-{key}-*.safetensors")):
        tensors = load_file(str(part))
        found.update(zip(tensors["fingerprints"].tolist(), tensors["logps"].tolist()))
    return found


@torch.no_grad()
def reference_logps(
    run: Callable[[dict[str, Any]], torch.Tensor],
    examples: Sequence[dict[str, Any]],
    device: torch.device,
    cache: str | Path | None = None,
    key: str = "",
    write: bool = True,
    per_batch: int = 64,
    part_size: int = 4096,
    progress: bool = False,
) -> int:
    """Set ``ref_logp`` in every example: from `cache` (a directory) where it holds the document
    for reference `key`, else computed by ``run(batch)`` (the summed completion log-prob of every
    ``cu_seqlens`` segment of a packed batch) in batches of `per_batch` documents; computed values
    are written to `cache` every `part_size` documents when `write`. Returns how many were computed."""
    known = read_cache(cache, key) if cache else {}
    prints = [fingerprint(e) for e in examples]
    todo = [i for i, f in enumerate(prints) if f not in known]
    for i, f in enumerate(prints):
        if f in known:
            examples[i]["ref_logp"] = known[f]
    start = len(list(Path(cache).glob(f"ref-{key}-*.safetensors"))) if cache else 0
    for n, lo in enumerate(tqdm(range(0, len(todo), part_size), desc="reference log-probs", disable=not progress)):
        part = todo[lo : lo + part_size]
        for b in range(0, len(part), per_batch):
            rows = [[examples[i]] for i in part[b : b + per_batch]]
            batch = collate_packed(rows, "rows")
            values = run(move_data_to_device(batch, device))[pair_documents(rows, batch, "rows").to(device)]
            for (e,), value in zip(rows, values.tolist()):
                e["ref_logp"] = value
        if cache and write:
            save_atomic({"fingerprints": torch.tensor([prints[i] for i in part], dtype=torch.int64),
                         "logps": torch.tensor([examples[i]["ref_logp"] for i in part], dtype=torch.float32)},
                        Path(cache) / f"ref-{key}-{start + n:05d}.safetensors")
    return len(todo)
