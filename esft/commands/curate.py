"""`esft curate`: run a curation pipeline on a data file and write the curated data (same file
type and record format as the input) and a report.

    esft curate --input data.jsonl --config configs/curation/clean_dedup_diverse.yaml --out curated/
    esft curate --input builtin --tasks arithmetic reverse_words --n 5000 --config C.yaml --out curated/

`--config` is a YAML list of stages, a mapping with a ``curation`` list, or a fit config whose
``data.init_args.curation`` holds them (see `esft.curation.pipeline`). Output under OUT: the
kept rows, unchanged, in a file named like the input (``data.jsonl`` for a directory, a hub
dataset or built-in tasks), ``report.md`` / ``report.json`` (per-stage removed counts and
times), ``scores_<stage>.png`` histograms and ``removed.jsonl`` (examples of removed records).
Scores and embeddings are cached (``$ESFT_CACHE`` or ``~/.cache/esft``), so rerunning with
another selector does not rescore.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from esft.commands.options import CommandParser
from esft.curation.pipeline import curate
from esft.curation.report import write_report
from esft.data.records import SUFFIXES, DataFormatError, Format, LoadStats, detect_format, read_rows, to_record
from esft.runconfig import load_yaml


def load_stages(path: str) -> list[dict[str, Any]]:
    cfg = load_yaml(path)  # 1e-3 as a float, as `esft fit` reads it
    if isinstance(cfg, dict):
        if "curation" in cfg:
            cfg = cfg["curation"]
        elif isinstance(cfg.get("data"), dict):
            cfg = (cfg["data"].get("init_args") or {}).get("curation")
    if not isinstance(cfg, list) or not cfg:
        raise DataFormatError(f"{path}: expected a list of curation stages (or a 'curation' list, or "
                              "data.init_args.curation in a fit config)")
    return cfg


def read_source(source: str, fmt: Format, skip: bool, tasks: list[str], n: int, seed: int):
    """(raw rows, records) in step; bad rows raise, or are skipped in both under `skip`."""
    if source == "builtin":
        from esft.data.tasks import build_task

        records = [r for t in tasks for r in build_task(t).generate(n, seed=seed)]
        return records, records
    stats = LoadStats()
    rows, records = [], []
    for where, row in read_rows(source):
        stats.read += 1
        try:
            record = to_record(row, fmt, where)
        except DataFormatError as e:
            if not skip:
                raise
            stats.skip(e)
            continue
        rows.append(dict(row))
        records.append(record)
    if stats.num_skipped:
        print(f"[curate] {stats.num_skipped} bad rows skipped: " + "; ".join(stats.examples[:3]))
    return rows, records


def write_rows(rows: list[dict[str, Any]], source: str, out: Path) -> Path:
    path = Path(source)
    suffix = path.suffix if path.is_file() and path.suffix in SUFFIXES else ".jsonl"
    target = out / (path.name if path.is_file() and path.suffix in SUFFIXES else "data.jsonl")
    if suffix == ".jsonl":
        target.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        target.write_text(json.dumps(rows, ensure_ascii=False, indent=1, default=str) + "\n", encoding="utf-8")
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_parquet(target, index=False) if suffix == ".parquet" else frame.to_csv(target, index=False)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser(prog="esft curate", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, options_flag="--options")
    parser.add_argument("--input", required=True, help="data file, directory, HF dataset id, or 'builtin'")
    parser.add_argument("--config", required=True, help="YAML with the curation stages")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="auto", help="record format of the input (default: detect per row)")
    parser.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    parser.add_argument("--seed", type=int, default=0, help="default seed of stages that take one")
    parser.add_argument("--tasks", nargs="+", default=["arithmetic", "reverse_words"], help="built-in tasks (--input builtin)")
    parser.add_argument("--n", type=int, default=1000, help="records per built-in task (--input builtin)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stages = load_stages(args.config)
    rows, records = read_source(args.input, args.format, args.on_bad_record == "skip", args.tasks, args.n, args.seed)
    start = time.perf_counter()
    kept, report = curate(records, stages, seed=args.seed)
    seconds = time.perf_counter() - start
    index = {id(r): i for i, r in enumerate(records)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = write_rows([rows[index[id(r)]] for r in kept], args.input, out)
    formats = [args.format] if args.format != "auto" or args.input == "builtin" else sorted({detect_format(r) for r in rows[:1000]})
    write_report(report, out, {"input_path": args.input, "output_path": str(target), "seconds": round(seconds, 2),
                               "formats": formats, "stages_config": stages})
    print(f"[curate] wrote {len(kept)} of {len(records)} records to {target}; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
