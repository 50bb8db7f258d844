"""`esft train-tokenizer`: train the built-in byte-level BPE tokenizer on the built-in tasks.

    esft train-tokenizer                          # regenerate the files the package ships
    esft train-tokenizer --out my_tok --vocab-size 4096
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esft.commands.options import CommandParser
from esft.models.tokenizer import BUILTIN_DIR, train_builtin_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft train-tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(BUILTIN_DIR), help=f"output directory (default: the shipped {BUILTIN_DIR})")
    p.add_argument("--vocab-size", type=int, default=2048)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    saved = train_builtin_tokenizer(Path(args.out), args.vocab_size)
    print(f"saved a {len(saved)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
