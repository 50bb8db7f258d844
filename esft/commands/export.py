"""Write built-in tasks to JSON Lines in any format `esft.data.records` reads.

Formats: ``messages``, ``prompt_response``, ``alpaca``, ``sharegpt``; every row keeps ``task``,
``answer``, ``id`` and ``source``, so `load_records` gives back the generated records.

Run:
    esft export --tasks math_word verdict --n 1000 --split train \\
        --format messages --out data/ [--kwargs '{"think": true}']

Example:
    >>> import tempfile
    >>> from esft.data.records import load_records
    >>> path = export_task("verdict", 3, seed=0, split="train", path=tempfile.mkdtemp() + "/v.jsonl", fmt="alpaca")
    >>> records, _ = load_records(str(path))
    >>> records == get_task("verdict").generate(3, seed=0)
    True
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esft.commands.options import CommandParser
from esft.data.tasks import TASKS, Split, get_task

FORMATS = ("messages", "prompt_response", "alpaca", "sharegpt")
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def to_row(record: dict, fmt: str = "messages") -> dict:
    """One record as a row of `fmt` (single-turn formats take the user and assistant turns)."""
    extra = {k: record[k] for k in ("task", "answer", "id", "source") if k in record}
    messages = record["messages"]
    if fmt == "messages":
        return {"messages": messages, **extra}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages],
                **extra}
    user = next(m["content"] for m in messages if m["role"] == "user")
    assistant = next(m["content"] for m in messages if m["role"] == "assistant")
    if fmt == "prompt_response":
        return {"prompt": user, "response": assistant, **extra}
    if fmt == "alpaca":
        return {"instruction": user, "input": "", "output": assistant, **extra}
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def export_task(name: str, n: int, seed: int = 0, split: Split = "train", path: str | Path = "data/task.jsonl",
                fmt: str = "messages", **task_kwargs) -> Path:
    """Generate `n` records of task `name` and write them to `path` as JSONL in format `fmt`."""
    records = get_task(name, **task_kwargs).generate(n, seed=seed, split=split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(to_row(record, fmt), ensure_ascii=False) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser(prog="esft export", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS), metavar="TASK",
                        help=f"tasks to write (default: all): {', '.join(sorted(TASKS))}")
    parser.add_argument("--n", type=int, default=1000, help="records per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--format", choices=FORMATS, default="messages")
    parser.add_argument("--out", default="data", help="output directory; one <task>.<split>.jsonl per task")
    parser.add_argument("--kwargs", type=json.loads, default={},
                        help='JSON task arguments for every task, e.g. \'{"think": true}\'')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in args.tasks:
        path = Path(args.out) / f"{name}.{args.split}.jsonl"
        export_task(name, args.n, args.seed, args.split, path, args.format, **args.kwargs)
        print(f"wrote {args.n} {args.split} records of {name} ({args.format}) to {path}")


if __name__ == "__main__":
    main()
