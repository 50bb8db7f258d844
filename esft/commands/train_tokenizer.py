"""`esft train-tokenizer`: train the built-in byte-level BPE tokenizer on the built-in tasks.

    esft train-tokenizer                          # regenerate the files the package ships
    esft train-tokenizer --out my_tok --vocab-size 4096
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esft.models.tokenizer import BUILTIN_DIR, train_builtin_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="esft train-tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(BUILTIN_DIR), help=f"output directory (default: the shipped {BUILTIN_DIR})")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args(argv)
    saved = train_builtin_tokenizer(Path(args.out), args.vocab_size)
    print(f"saved a {len(saved)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
