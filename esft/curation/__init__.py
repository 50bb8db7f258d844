"""Data curation: filters, dedup, scorers, embedders and budgeted selectors, composed into a
pipeline from YAML (`SFTDataModule(curation=[...])` or ``esft curate``). See `pipeline`."""

from __future__ import annotations

from typing import Any

from esft.curation.base import Budget, records_hash
from esft.curation.curriculum import order_records, ordered_rows
from esft.curation.embedders import EMBEDDERS, build_embedder
from esft.curation.filters import FILTERS
from esft.curation.pipeline import Pipeline, Report, curate
from esft.curation.scorers import SCORERS, build_scorer
from esft.curation.selectors import SELECTORS


def prepare(records: list[dict[str, Any]], curation: list[dict[str, Any]] | None, curriculum: dict[str, Any] | None,
            seed: int | None = None, logger: Any = None) -> list[dict[str, Any]]:
    """What `SFTDataModule` does between loading and tokenizing: curate (report printed and logged
    to `logger`), then order for a curriculum."""
    if curation:
        from esft.curation.report import log_report

        records, report = curate(records, curation, seed=seed)
        log_report(logger, report)
    if curriculum:
        records, _ = order_records(records, curriculum)
    return records


__all__ = ["EMBEDDERS", "FILTERS", "SCORERS", "SELECTORS", "Budget", "Pipeline", "Report", "build_embedder",
           "build_scorer", "curate", "order_records", "ordered_rows", "prepare", "records_hash"]
