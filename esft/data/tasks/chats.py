"""Synthetic multi-turn conversations from the built-in tasks, for data-scale tests and benchmarks.

    python -m esft.data.tasks.chats --n 1000000 --out chats.jsonl

Each conversation has a system prompt and 1–4 user/assistant turns, every turn a problem of a
built-in task with its reference answer (`Task.sample`): chat-shaped data of any size, made offline.
Problems are drawn without the train/held-out split or de-duplication of `Task.generate`, so a
conversation may repeat a problem seen elsewhere; they are for measuring the data path, not quality.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from esft.data.tasks import TaskSpec, build_task

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Answer with the result only.",
    "Answer every question exactly and briefly.",
)
DEFAULT_TASKS: tuple[str, ...] = ("arithmetic", "reverse_words", "sort_words", "math_word", "list_ops")


def synthetic_chats(n: int, seed: int = 0, tasks: list[TaskSpec] | None = None, max_turns: int = 4) -> Iterator[dict]:
    """`n` conversations in the ``messages`` format, reproducible from `seed`."""
    built = [build_task(spec) for spec in (tasks or DEFAULT_TASKS)]
    rng = random.Random(f"chats:{seed}")
    for i in range(n):
        task = rng.choice(built)
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
        for _ in range(rng.randint(1, max_turns)):
            prompt, answer = task.sample(rng)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        yield {"messages": messages, "task": task.name, "id": f"chat-{seed}-{i}"}


def write_chats(path: Path, n: int, seed: int = 0, tasks: list[TaskSpec] | None = None) -> Path:
    """Write `synthetic_chats` to a JSON Lines file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in synthetic_chats(n, seed, tasks):
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="conversations to write")
    parser.add_argument("--out", type=Path, required=True, help="a .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=None, help=f"built-in tasks (default: {' '.join(DEFAULT_TASKS)})")
    args = parser.parse_args(argv)
    write_chats(args.out, args.n, args.seed, args.tasks)


if __name__ == "__main__":
    main()
