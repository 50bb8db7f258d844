"""Atomic checkpoint writes: a run killed during a save leaves the previous checkpoint usable, a
full disk names the checkpoint; a checkpoint (or model directory) that cannot be read fails with
its path and the reason, in one line (`CheckpointError`, `reading`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from esft.paths import looks_local, writing


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or unreadable."""

    @classmethod
    def unreadable(cls, path, error: Exception) -> "CheckpointError":
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        return cls(f"{path}: cannot be loaded as a checkpoint ({type(error).__name__}: {reason})")


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Load the checkpoint file, model directory or hub id `path` inside this block: a local path
    that does not exist, or any error while reading, becomes a one-line `CheckpointError` naming it.

        with reading(name):
            module = CausalLMModule.load_from_checkpoint(name, map_location="cpu")
    """
    if looks_local(path, {".ckpt", ".safetensors", ".bin", ".pt"}) and not Path(path).expanduser().exists():
        kind = "checkpoint file" if Path(path).suffix == ".ckpt" else "model directory"
        raise CheckpointError(f"{path}: no such {kind}")
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # truncated file, not a checkpoint, a config that does not parse, ...
        raise CheckpointError.unreadable(path, e) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp``, fsyncs, then renames over `path` (atomic on POSIX filesystems).

    Remote filesystems (fsspec URLs) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        get_filesystem(path).makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        try:
            with writing(path), open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: free what the partial file took
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            if map_location is None:
                return super().load_checkpoint(path, weights_only=weights_only)
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: no such checkpoint file") from e
        except Exception as e:  # truncated file, not a torch checkpoint, unpickling refused, ...
            raise CheckpointError.unreadable(path, e) from e
