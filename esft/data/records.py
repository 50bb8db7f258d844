"""One internal record schema, adapters for common SFT formats, and file readers that name bad rows.

Record: ``{"messages": [{"role", "content"}, ...], "task"?, "answer"?, "id"?, "source"?}``.

Formats (``auto`` detects them from a row's keys):

- ``prompt_response``: ``prompt`` + ``response`` (or ``completion``), optional ``system``;
- ``alpaca``: ``instruction`` + optional ``input`` + ``output``;
- ``messages``: OpenAI ``messages`` list of ``{"role", "content"}`` (multi-turn, system role);
- ``sharegpt``: ``conversations`` list of ``{"from", "value"}`` (human/gpt/system).

Sources: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory of such files, or a HF
dataset id (loaded with ``datasets.load_dataset``). JSON, JSON Lines and CSV are read here, not
through ``datasets``, so that a malformed line, or a byte that is not UTF-8, is reported with its
file and line number; a UTF-8 byte-order mark is accepted. CSV cells are read as text (an
``answer`` of ``007`` stays ``"007"``); only an empty cell counts as missing. A source that looks
like a local path (`esft.paths.looks_local`) and does not exist is a missing file, never a hub
lookup.

Every loaded record is a `Record`: a plain dict that also remembers where it was read
(``file:line``), so that later stages (tokenization, after shuffling and curation) can name the
row they reject.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esft.paths import looks_local

log = logging.getLogger(__name__)

Format = Literal["auto", "prompt_response", "alpaca", "messages", "sharegpt"]
OnBadRecord = Literal["error", "skip"]
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = ("system", "user", "assistant")
PASSTHROUGH = ("task", "answer", "id", "source")
# file extensions that mark a source as a local file even where it does not exist
PATH_SUFFIXES = {*SUFFIXES, ".gz", ".zst", ".txt", ".tsv", ".arrow"}


class Record(dict):
    """A record that remembers where it was read (`origin`, ``file:line``). It compares, copies and
    serialises as the plain dict it is; a new dict built from it forgets the origin."""

    def __init__(self, fields: dict[str, Any], origin: str | None = None) -> None:
        super().__init__(fields)
        self.origin = origin


def origin(record: dict[str, Any]) -> str | None:
    """Where `record` was read (``file:line``), or None for a record made in memory."""
    return getattr(record, "origin", None)


class DataFormatError(ValueError):
    """A row that cannot become a record; the message names where it is and what is wrong."""


@dataclass
class LoadStats:
    """What happened while loading: rows read, skipped (with reasons), formats seen."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skip messages, for the report

    def merge(self, other: "LoadStats") -> None:
        """Add the counts of `other` (the same source read in parts)."""
        self.read += other.read
        self.skipped += other.skipped
        self.formats += other.formats
        self.examples += other.examples[: max(0, 5 - len(self.examples))]

    def skip(self, error: DataFormatError) -> None:
        reason = str(error).split(": ", 1)[-1]
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def detect_format(row: dict[str, Any]) -> Format:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt_response"
    raise DataFormatError(
        f"cannot detect the format from the fields {sorted(row)}; expected one of: messages, "
        "conversations (ShareGPT), instruction/input/output (alpaca), prompt/response or prompt/completion"
    )


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (CSV / parquet)
        if required:
            raise DataFormatError(f"{where}: field {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataFormatError(f"{where}: field {key!r} is empty")
    return value


def _turns(row: dict, key: str, role_key: str, content_key: str, roles: dict[str, str], where: str) -> list[dict]:
    turns = row.get(key)
    if isinstance(turns, str):  # CSV cells hold JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: field {key!r} is not valid JSON ({e.msg})") from None
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: field {key!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataFormatError(f"{where}: field {key}[{i}] must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataFormatError(
                f"{where}: field {key}[{i}].{role_key} is {role!r}; expected one of {sorted(roles)}"
            )
        content = _text(turn, content_key, where, required=True) if roles[role] == "assistant" else \
            _text(turn, content_key, where, required=False)
        messages.append({"role": roles[role], "content": content})
    return messages


def to_record(row: dict[str, Any], fmt: Format = "auto", where: str = "<row>") -> dict[str, Any]:
    """Normalise one row into a record, or raise `DataFormatError` naming `where` and the field."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
    if fmt == "auto":
        try:
            fmt = detect_format(row)
        except DataFormatError as e:
            raise DataFormatError(f"{where}: {e}") from None
    if fmt == "messages":
        messages = _turns(row, "messages", "role", "content", {r: r for r in ROLES}, where)
    elif fmt == "sharegpt":
        messages = _turns(row, "conversations", "from", "value", SHAREGPT_ROLES, where)
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    elif fmt == "prompt_response":
        key = "completion" if "completion" in row and "response" not in row else "response"
        messages = [{"role": "user", "content": _text(row, "prompt", where)},
                    {"role": "assistant", "content": _text(row, key, where)}]
        system = _text(row, "system", where, required=False)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    else:
        raise DataFormatError(f"{where}: unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: the conversation has no assistant turn to train on")
    record = {"messages": messages}
    for key in PASSTHROUGH:
        if row.get(key) is not None:
            record[key] = row[key] if key == "answer" else str(row[key])
    return record


def _utf8(raw: bytes, path: Path, line: int, first: bool = True) -> str:
    """`raw` (line `line` of `path` onwards) as text; a UTF-8 byte-order mark is dropped where the
    file starts, other bytes that are not UTF-8 are an error naming the line and column."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); re-save the file as UTF-8"
        ) from None


def _decode(path: Path) -> str:
    return _utf8(path.read_bytes(), path, 1)


def jsonl_rows(path: Path, lines: list[bytes], first_line: int) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of raw JSON Lines `lines` of `path`, the first being line `first_line`;
    blank lines are skipped, a malformed one raises naming its line."""
    for lineno, raw in enumerate(lines, first_line):
        line = _utf8(raw, path, lineno, first=lineno == 1)
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield from jsonl_rows(path, [raw], lineno)


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: a .json file must hold an array of records (use .jsonl for one per line)")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """Every cell as text (no numeric or ``NA`` guessing); an empty cell is missing (``None``)."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(_decode(path)), dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as e:
        raise DataFormatError(f"{path}: malformed CSV ({str(e).strip()})") from None
    except pd.errors.EmptyDataError:
        return
    for i, row in enumerate(frame.to_dict("records")):  # line 1 is the header
        yield f"{path}:line {i + 2}", {k: None if isinstance(v, float) else v for k, v in row.items()}


def _read_parquet(path: Path, batch_size: int = 4096) -> Iterator[tuple[str, Any]]:
    """Row groups are read a batch at a time, so a file larger than memory streams."""
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def files_of(path: Path) -> list[Path]:
    """The data files of a local source: the file itself, or a directory's files in sorted order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
        return files
    if path.suffix not in SUFFIXES:
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}")
    return [path]


def read_rows(source: str, split: str = "train", name: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` from a file, a directory of files, or a HF dataset id."""
    path = Path(source).expanduser()
    if path.exists():
        for file in files_of(path):
            yield from READERS[SUFFIXES[file.suffix]](file)
        return
    if looks_local(source, PATH_SUFFIXES):
        raise FileNotFoundError(f"{source}: no such file or directory")
    from datasets import load_dataset  # a HF hub id (or a dataset script / local dataset name)

    for i, row in enumerate(load_dataset(source, name, split=split)):
        yield f"{source}[{split}][{i}]", row


def load_records(
    source: str,
    fmt: Format = "auto",
    on_bad_record: OnBadRecord = "error",
    split: str = "train",
    name: str | None = None,
) -> tuple[list[dict[str, Any]], LoadStats]:
    """Read and normalise every row; bad rows raise, or are counted in `LoadStats` under ``skip``.

    A malformed file (JSON that does not parse) always raises: skipping cannot recover its rows.
    """
    stats = LoadStats()
    records = to_records(read_rows(source, split=split, name=name), source, fmt, on_bad_record, stats)
    if not records:
        raise DataFormatError(f"{source}: no usable records ({stats.read} read, {stats.num_skipped} skipped)")
    return records, stats


def to_records(
    rows: Iterable[tuple[str, Any]], source: str, fmt: Format, on_bad_record: OnBadRecord, stats: LoadStats,
) -> list[Record]:
    """Normalise ``(where, row)`` pairs into `Record`s, counting into `stats`; a bad row raises,
    or under ``skip`` is counted. Records without a ``source`` get `source`."""
    records = []
    for where, row in rows:
        stats.read += 1
        try:
            record = to_record(row, fmt, where)
        except DataFormatError as e:
            if on_bad_record == "error":
                raise
            stats.skip(e)
            continue
        stats.formats[fmt if fmt != "auto" else detect_format(row)] += 1
        record.setdefault("source", source)
        records.append(Record(record, origin=where))
    return records
