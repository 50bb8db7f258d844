"""Local paths: telling a misspelt local path from a hub id, and naming the file an OS error hit.

    >>> looks_local("data/trian.jsonl", {".jsonl"}), looks_local("org/dataset", {".jsonl"})
    (True, False)
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path


def looks_local(source: str, suffixes: Collection[str] = ()) -> bool:
    """Whether `source` can only be a local path, not a hub id (``name`` or ``org/name``): it starts
    with ``.``, ``/`` or ``~``, ends in one of `suffixes`, holds a backslash or more than one ``/``,
    or its first part is a local directory (``data/trian`` beside a ``data/`` folder)."""
    path = Path(source).expanduser()
    return (source.startswith((".", "/", "~")) or path.suffix in suffixes or "\\" in source
            or source.count("/") > 1 or (len(path.parts) > 1 and path.parent.is_dir()))


@contextmanager
def writing(path) -> Iterator[None]:
    """An `OSError` inside the block that names no file (a full disk reports itself on a write to
    an open file) is raised again naming `path`, with the same errno and type."""
    try:
        yield
    except OSError as e:
        if e.errno is None or e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
