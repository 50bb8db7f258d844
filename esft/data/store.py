"""Tokenized examples on disk: prepared once per source and options, memory-mapped by every rank
and every later run.

`prepare_store` reads a source (a file, a directory of files, or a HF dataset id), normalises its
rows into records, tokenizes them with the chat template's prompt masking (`esft.data.tokenize`)
in `num_proc` worker processes, and writes the examples to an entry of the cache directory named
by a fingerprint of everything that decides them:

- the source: every data file's path, size and modification time (a hub dataset: its id,
  configuration and split);
- the tokenizer (its vocabulary and rules, `tokenizer_fingerprint`) and chat template;
- the options: format, bad-row policy, ``max_length``, ``train_on``, ``multiturn``, truncation.

Changing any of them prepares a new entry; an unchanged one opens in a fraction of a second.
JSON Lines files are read as raw lines and parsed in the workers, Parquet a row group at a time,
so a file larger than memory streams through; errors name the file and line as
`esft.data.records.load_records` does. An entry is written to a temporary directory and renamed
into place when complete, under a lock that makes concurrent preparers (several ranks, two runs)
wait for one another: a killed preparation leaves no entry behind, only a temporary directory
that the next preparation removes.

An entry is a directory of flat arrays: ``tokens`` (int32, all examples back to back), ``trained``
(uint8: 1 where the token is a label) and per example ``offsets``, ``trained_tokens``,
``record`` (the index of the record it came from among the source's usable records) and
``task``, with ``meta.json`` holding the fingerprint's inputs and the preparation report.
`ExampleStore` maps them read-only: the pages are shared by every process that maps the entry,
an example is a slice, and lengths and trained-token counts are arrays, so that packing plans
for a million examples need no pass over the tokens. (`datasets` stores the same columns in
Arrow, but its row access converts each row to Python lists through the Arrow format, and the
per-example arrays here would be extra columns to convert; a flat memory map is all this needs.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from itertools import chain
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esft.data.records import (
    SUFFIXES,
    DataFormatError,
    Format,
    LoadStats,
    OnBadRecord,
    files_of,
    jsonl_rows,
    read_rows,
    to_records,
)
from esft.data.tokenize import IGNORE_INDEX, MultiTurn, TokenizeStats, TrainOn, Truncation, iter_examples

STORE_VERSION = 1  # bump when the entry layout or the tokenization of a record changes
CHUNK_ROWS = 2000  # rows per worker task
COLUMNS = {"offsets": np.int64, "trained_tokens": np.int32, "record": np.int64, "task": np.int32}


def default_cache_dir() -> Path:
    """``$ESFT_DATA_CACHE``, else ``$XDG_CACHE_HOME/esft/data`` (``~/.cache/esft/data``)."""
    if os.environ.get("ESFT_DATA_CACHE"):
        return Path(os.environ["ESFT_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "esft" / "data"


def default_num_proc() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class StoreOptions:
    """What decides the examples of a source (besides the source and the tokenizer)."""

    format: Format = "auto"
    on_bad_record: OnBadRecord = "error"
    max_length: int = 1024
    train_on: TrainOn = "assistant"
    multiturn: MultiTurn = "per_turn"
    truncation: Truncation = "right"
    name: str | None = None  # HF dataset configuration (hub ids only)
    split: str = "train"  # HF dataset split (hub ids only)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's output: its vocabulary and rules (the fast backend's
    serialisation less its truncation and padding state, else its vocabulary), its special tokens
    and its chat template."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        # without the truncation and padding state: any call with other settings changes it, not the tokens
        rules = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        rules = json.dumps(rules, sort_keys=True)
    else:
        rules = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, rules, json.dumps(tokenizer.special_tokens_map, sort_keys=True),
             tokenizer.chat_template or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def source_identity(source: str, options: StoreOptions) -> dict[str, Any]:
    """The source part of the fingerprint: each local file's path, size and mtime, or a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        files = []
        for f in files_of(path):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": files}
    return {"hub": source, "name": options.name, "split": options.split}


def fingerprint(source: str, tokenizer, options: StoreOptions) -> tuple[str, dict[str, Any]]:
    """The entry name for `source` prepared with `tokenizer` and `options`, and what it hashes."""
    inputs = {"version": STORE_VERSION, "source": source_identity(source, options),
              "tokenizer": tokenizer_fingerprint(tokenizer), "options": asdict(options)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return digest, inputs


# ---- reading ---------------------------------------------------------------------------------
class ExampleStore(Sequence):
    """The examples of a prepared entry, read-only and memory-mapped. Item ``i`` is an example
    dict (``input_ids``, ``labels``, ``length``, and ``task`` where the record had one) built
    from slices of the maps; `lengths` and `trained_tokens` are arrays for packing plans.
    A store pickles as its directory (DataLoader workers map the entry themselves)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        n = self.meta["examples"]
        self.tokens = self._map("tokens", np.int32, self.meta["tokens"])
        self.trained = self._map("trained", np.uint8, self.meta["tokens"])
        self.offsets = self._map("offsets", np.int64, n + 1)
        self.trained_tokens = self._map("trained_tokens", np.int32, n)
        self.record = self._map("record", np.int64, n)
        self.task = self._map("task", np.int32, n)
        self.tasks: list[str] = self.meta["tasks"]
        self.lengths = np.diff(self.offsets)

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.directory / f"{name}.bin", dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.tokens[lo:hi]
        example = {"input_ids": ids.tolist(), "labels": np.where(self.trained[lo:hi] != 0, ids, IGNORE_INDEX).tolist(),
                   "length": hi - lo}
        task = int(self.task[i])
        if task >= 0:
            example["task"] = self.tasks[task]
        return example

    def __reduce__(self):
        return ExampleStore, (str(self.directory),)

    @property
    def num_records(self) -> int:
        return self.meta["records"]


class ExampleView(Sequence):
    """Examples `index` of one or more stores, in that order (a split, a subsample, a mixture).
    `parts` is a list of ``(store, indices)``; item ``i`` runs through them end to end."""

    def __init__(self, parts: list[tuple[Sequence, np.ndarray]]) -> None:
        self.parts = [(store, np.asarray(index, dtype=np.int64)) for store, index in parts]
        self.ends = np.cumsum([len(index) for _, index in self.parts])
        self.lengths = np.concatenate([store.lengths[index] for store, index in self.parts] or [np.zeros(0, np.int64)])
        self.trained_tokens = np.concatenate(
            [store.trained_tokens[index] for store, index in self.parts] or [np.zeros(0, np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        part = int(np.searchsorted(self.ends, i, side="right"))
        store, index = self.parts[part]
        return store[int(index[i - (self.ends[part - 1] if part else 0)])]


def record_examples(store: ExampleStore, records: Sequence[int] | np.ndarray) -> np.ndarray:
    """The indices of the examples of `records` (record indices, in that order): a record gives
    zero, one or several examples, stored contiguously."""
    records = np.asarray(records, dtype=np.int64)
    first = np.searchsorted(store.record, records, side="left")
    count = np.searchsorted(store.record, records, side="right") - first
    if count.sum() == 0:
        return np.zeros(0, np.int64)
    # for each record, first, first + 1, ..., first + count - 1
    starts = np.repeat(first - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
    return starts + np.arange(int(count.sum()))


# ---- preparing -------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, waiting for its holder (another rank preparing the entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _row_chunks(rows: Iterator[tuple[str, Any]], size: int = 0) -> Iterator[tuple[str, Any, int]]:
    """``("rows", [(where, row), ...], progress)`` jobs of `CHUNK_ROWS` rows; the last carries `size`."""
    chunk: list[tuple[str, Any]] = []
    for where_row in rows:
        chunk.append(where_row)
        if len(chunk) == CHUNK_ROWS:
            yield "rows", chunk, 0
            chunk = []
    yield "rows", chunk, size


def _jobs(source: str, options: StoreOptions) -> Iterator[tuple[str, Any, int]]:
    """Work for the workers, in source order, each with the bytes of the source it covers (for
    the progress bar): ``("jsonl", (path, raw lines, first line), bytes)`` for JSON Lines, parsed
    in the worker; ``("rows", [(where, row), ...], bytes)`` for the other formats and hub datasets."""
    path = Path(source).expanduser()
    if not path.exists():
        yield from _row_chunks(read_rows(source, split=options.split, name=options.name))
        return
    for file in files_of(path):
        if SUFFIXES[file.suffix] != "jsonl":
            yield from _row_chunks(read_rows(str(file)), file.stat().st_size)
            continue
        with file.open("rb") as f:
            lines, first, size = [], 1, 0
            for lineno, raw in enumerate(f, 1):
                if not lines:
                    first = lineno
                lines.append(raw)
                size += len(raw)
                if len(lines) == CHUNK_ROWS:
                    yield "jsonl", (file, lines, first), size
                    lines, size = [], 0
            if lines:
                yield "jsonl", (file, lines, first), size


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, source: str, options: StoreOptions) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tokenizer=tokenizer, source=source, options=options)


def _prepare_chunk(kind: str, payload: Any) -> dict[str, Any]:
    """Records and examples of one job: flat arrays plus the chunk's load and tokenize counts."""
    tokenizer, source, o = _WORKER["tokenizer"], _WORKER["source"], _WORKER["options"]
    rows = jsonl_rows(*payload) if kind == "jsonl" else payload
    load = LoadStats()
    records = to_records(rows, source, o.format, o.on_bad_record, load)
    stats = TokenizeStats()
    examples = list(iter_examples(records, tokenizer, o.max_length, o.train_on, o.truncation, o.multiturn, stats))
    lengths = np.asarray([len(ids) for _, ids, _ in examples], dtype=np.int64)
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(ids for _, ids, _ in examples), dtype=np.int32, count=total)
    trained = np.fromiter(chain.from_iterable(labels for _, _, labels in examples), dtype=np.int64, count=total)
    trained = (trained != IGNORE_INDEX).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # next-token targets: the trained tokens after each example's first (`esft.data.packing.trained_tokens`)
    per_example = np.add.reduceat(trained, starts, dtype=np.int64) - trained[starts] if len(examples) else starts
    return {
        "tokens": tokens,
        "trained": trained,
        "lengths": lengths,
        "trained_tokens": per_example,
        "record": np.asarray([j for j, _, _ in examples], dtype=np.int64),
        "tasks": [records[j].get("task") for j, _, _ in examples],
        "records": len(records),
        "load": load,
        "stats": stats,
    }


def _results(jobs: Iterator[tuple[str, Any, int]], num_proc: int, init_args: tuple) -> Iterator[tuple[dict, int]]:
    """`_prepare_chunk` of every job, in order, with at most ``2 * num_proc`` jobs in flight (the
    reader never runs ahead of the workers by more than that, whatever the file's size)."""
    if num_proc <= 1:
        _init_worker(*init_args)
        for kind, payload, size in jobs:
            yield _prepare_chunk(kind, payload), size
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, _init_worker, init_args) as pool:
        pending: deque = deque()
        for kind, payload, size in jobs:
            pending.append((pool.apply_async(_prepare_chunk, (kind, payload)), size))
            if len(pending) >= 2 * num_proc:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


def _total_bytes(source: str) -> int | None:
    path = Path(source).expanduser()
    return sum(f.stat().st_size for f in files_of(path)) if path.exists() else None


def prepare_store(
    source: str,
    tokenizer,
    options: StoreOptions,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> ExampleStore:
    """The prepared entry of `source`, preparing it first when the cache has none (see the module
    docstring). Raises `DataFormatError` naming the row at the first bad row (``on_bad_record:
    error``) or when no record is usable."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    digest, inputs = fingerprint(source, tokenizer, options)
    entry = root / digest
    if (entry / "meta.json").exists():
        return ExampleStore(entry)
    with _locked(root / f"{digest}.lock"):
        if (entry / "meta.json").exists():  # another process prepared it meanwhile
            return ExampleStore(entry)
        for stale in root.glob(f"{digest}.tmp-*"):  # left by a killed preparation
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{digest}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            meta = _write_entry(tmp, source, tokenizer, options, num_proc or default_num_proc(), progress)
            meta["fingerprint"] = inputs
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ExampleStore(entry)


def _write_entry(tmp: Path, source: str, tokenizer, options: StoreOptions, num_proc: int, progress: bool) -> dict:
    started = time.perf_counter()
    load, stats = LoadStats(), TokenizeStats()
    columns: dict[str, list[np.ndarray]] = {name: [] for name in ("lengths", "trained_tokens", "record", "task")}
    task_ids: dict[str, int] = {}
    records = tokens = 0
    total = _total_bytes(source)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"preparing {Path(source).name}", mininterval=1.0,
               disable=not progress or (total is not None and total < 8 << 20))  # no bar for small files
    # the bar ends its line also when a bad row stops the preparation (the error then starts a line)
    with bar, open(tmp / "tokens.bin", "wb") as tok_file, open(tmp / "trained.bin", "wb") as mask_file:
        for chunk, size in _results(_jobs(source, options), num_proc, (tokenizer, source, options)):
            tok_file.write(chunk["tokens"].tobytes())
            mask_file.write(chunk["trained"].tobytes())
            columns["lengths"].append(chunk["lengths"])
            columns["trained_tokens"].append(chunk["trained_tokens"])
            columns["record"].append(chunk["record"] + records)
            columns["task"].append(np.asarray([-1 if t is None else task_ids.setdefault(str(t), len(task_ids))
                                               for t in chunk["tasks"]], dtype=np.int32))
            records += chunk["records"]
            tokens += len(chunk["tokens"])
            load.merge(chunk["load"])
            stats.merge(chunk["stats"])
            bar.update(size)
            bar.set_postfix(records=records, refresh=False)
    if not records:
        raise DataFormatError(f"{source}: no usable records ({load.read} read, {load.num_skipped} skipped)")
    lengths = np.concatenate(columns.pop("lengths")) if columns["record"] else np.zeros(0, np.int64)
    arrays = {"offsets": np.concatenate([[0], np.cumsum(lengths)]),
              **{name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}}
    for name, dtype in COLUMNS.items():
        arrays[name].astype(dtype).tofile(tmp / f"{name}.bin")
    return {
        "version": STORE_VERSION, "source": source, "records": records, "examples": len(lengths), "tokens": tokens,
        "tasks": list(task_ids), "seconds": round(time.perf_counter() - started, 2), "num_proc": num_proc,
        "load": {"read": load.read, "formats": dict(load.formats), "skipped": load.num_skipped,
                 "skip_reasons": dict(load.skipped), "skip_examples": list(load.examples)},
        "tokenize": {"examples": stats.examples, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
                     "truncated": stats.truncated, "dropped": dict(stats.dropped),
                     "system_not_rendered": stats.system_not_rendered},
    }
