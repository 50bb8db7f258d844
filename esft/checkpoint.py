"""Checkpoints that can be trusted: atomic writes (a run killed during a save leaves the previous
checkpoint usable; a full disk names the checkpoint), a one-line error for a checkpoint or model
directory that cannot be read (`CheckpointError`, `reading`), ``--ckpt_path last`` resolved to
the newest intact checkpoint, and a resume refused when the run's model or data options differ
from those the checkpoint was written with."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator, Mapping
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
        if os.path.lexists(tmp):  # a leftover of a killed save, or a planted link: never written through
            os.unlink(tmp)
        try:
            with writing(path):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as f:
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


def checkpoint_dirs(trainer) -> list[str]:
    """Where the trainer's `ModelCheckpoint` callbacks write, resolved as Lightning resolves an
    unset ``dirpath``: ``<save_dir>/<name>/<version>/checkpoints`` of the first logger, or
    ``<default_root_dir>/checkpoints`` without one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            dirs.append(str(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            dirs.append(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints"))
        else:
            dirs.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return dirs


def load_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped, not read (CheckpointError if the
    file is missing, truncated or not a checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with reading(str(path)):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _intact(path: str) -> bool:
    if os.path.isdir(path):  # a sharded checkpoint (FSDP2 / DeepSpeed): a directory of files
        return any(os.scandir(path))
    try:
        load_meta(path)
        return True
    except CheckpointError:
        return False


def resolve_last(dirs: list[str]) -> str | None:
    """The checkpoint ``--ckpt_path last`` resumes: ``last*.ckpt`` if intact, else the newest
    intact checkpoint of `dirs`; None when there is none at all. Temporary files left by a
    killed save are removed; an unreadable file is passed over with a warning naming it."""
    from lightning.pytorch.utilities import rank_zero_warn

    found: list[str] = []
    for d in dirs:
        for tmp in glob.glob(os.path.join(glob.escape(d), "*.ckpt.tmp")):
            os.unlink(tmp)
        found += glob.glob(os.path.join(glob.escape(d), "*.ckpt"))
    order = sorted(found, key=lambda p: (os.path.basename(p).startswith("last"), os.path.getmtime(p)), reverse=True)
    for path in order:
        if _intact(path):
            if not os.path.basename(path).startswith("last"):
                rank_zero_warn(f"--ckpt_path last: no intact last checkpoint in {', '.join(dirs)}; resuming {path}")
            return path
        rank_zero_warn(f"--ckpt_path last: {path} cannot be read; passing over it")
    return None


# options that do not change what a resumed run computes
RESUME_FREE = {"num_workers", "max_new_tokens", "cache", "cache_dir", "num_proc"}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_changes(checkpoint: Mapping[str, Any], model: Mapping[str, Any], data: Mapping[str, Any] | None) -> list[str]:
    """The model and data options whose values differ between a checkpoint and this run, as
    ``model.lr: 0.001 -> 0.003`` lines (options in `RESUME_FREE` and private keys left out)."""
    changes = []
    pairs = [("model", checkpoint.get("hyper_parameters"), model)]
    if data is not None and checkpoint.get("datamodule_hyper_parameters") is not None:
        pairs.append(("data", checkpoint["datamodule_hyper_parameters"], data))
    for section, saved, now in pairs:
        saved, now = _plain(saved or {}), _plain(now or {})
        for key in sorted(set(saved) | set(now)):
            if key not in RESUME_FREE and saved.get(key) != now.get(key):
                changes.append(f"{section}.{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes
