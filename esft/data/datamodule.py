"""SFTDataModule: load -> validate -> tokenize (prompt-masked) -> pack -> loaders.

Run it through the CLI, e.g. ``esft fit --config configs/sft/quickstart.yaml --data.path data.jsonl``.
Its stages (records -> examples -> batches) are public methods that other DataModules extend; the
class docstring lists them.
Preparation prints one report: rows read and skipped (with reasons), examples truncated or
dropped, tokens, and how full the packed micro-batches are. Under a trainer the same counts go to
``data_report.json`` in the run directory (``trainer.log_dir``) and to the logger as ``data/*``
scalars at step 0.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from esft.data.packing import (
    Collate,
    Layout,
    PackedRows,
    PackingNeeds,
    ResumableBatchSampler,
    ResumableLoader,
    best_fit_decreasing,
    collate_fixed,
    collate_packed,
    collate_padded,
    example_lengths,
    example_trained_tokens,
    max_segments,
    with_step_tokens,
)
from esft.data.mixture import MixBy, Source, mix, parse_sources
from esft.data.prompts import prompt_messages
from esft.data.records import DataFormatError, Format, LoadStats, OnBadRecord, load_records
from esft.data.store import ExampleStore, ExampleView, StoreOptions, prepare_store, record_examples
from esft.data.tasks import TaskSpec, build_task
from esft.data.tokenize import MultiTurn, TokenizeStats, TrainOn, Truncation, tokenize_records
from esft.loggers import log_to_all
from esft.models.chat_templates import resolve_chat_template
from esft.models.tokenizer import BUILTIN, load_tokenizer


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions ``0..n-1`` split into training and held-out ones: a seeded shuffle, the first
    ``max(1, round(n * fraction))`` held out (the same split for records in memory and cached)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, round(n * fraction))
    return order[k:], order[:k]


def prompt_key(record: dict[str, Any]) -> str:
    """A record's prompt (its conversation without the final answer) as one string."""
    return json.dumps(prompt_messages(record), sort_keys=True)


class SFTDataModule(L.LightningDataModule):
    """Chat and prompt/response data for the causal-LM objectives, in three public stages that a
    subclass extends by overriding any of these methods (none of them private):

    - **records**: `load_records` gives the training and validation records: built-in tasks
      (`task_records`) or files and hub sources (`read_records`, one source each), with the
      validation split and `extra_paths`. Curation then applies to the training records.
    - **examples**: `to_examples` tokenizes records into prompt-masked examples
      (``input_ids``, ``labels``, ``length``).
    - **batches**: `loader` builds a split's DataLoader from `units` (the example groups that
      travel together, e.g. packed rows or pairs, and how many make a micro-batch), `unit_counts`
      (what each unit adds to its optimizer step's loss denominator), `row_length` and `collate`.

    File and hub sources normally skip the first two stages: the example cache (`esft.data.store`)
    tokenizes them in worker processes. A subclass that overrides `load_records`, `read_records`
    or `to_examples` keeps its data in memory instead, so its stages always run.

    The model's needs reach the data once through `connect` (`PackingNeeds`: flat or row layout,
    fixed shapes); the objectives call it from their `setup`, which Lightning runs after this
    module's `setup` and before it builds any loader. Unconnected, a DataModule packs ``rows``
    without fixed shapes; the `layout` and `pad_to_budget` options win over either.
    """

    RECORD_STAGES = ("load_records", "read_records", "to_examples")
    """The stages the example cache replaces for file and hub sources (see the class docstring)."""

    def __init__(
        self,
        path: str = BUILTIN,
        format: Format = "auto",
        name: str | None = None,
        split: str = "train",
        val_path: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.0,
        tasks: list[TaskSpec] | None = None,
        num_train_per_task: int = 2000,
        num_val_per_task: int = 100,
        seed: int = 0,
        tokenizer_name: str | None = None,
        chat_template: str | None = None,
        max_length: int = 1024,
        train_on: TrainOn = "assistant",
        multiturn: MultiTurn = "per_turn",
        truncation: Truncation = "right",
        on_bad_record: OnBadRecord = "error",
        packing: bool = True,
        max_tokens: int = 4096,
        layout: Literal["auto", "flat", "rows"] = "auto",
        pad_to_budget: bool | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        curation: list[dict[str, Any]] | None = None,
        curriculum: dict[str, Any] | None = None,
        extra_paths: list[str] | None = None,
        sources: list[str | dict[str, Any]] | None = None,
        mix_by: MixBy = "tokens",
        cache: bool = True,
        cache_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        """
        Args:
            path: a .jsonl/.json/.parquet/.csv file, a directory of them, a HF dataset id, or
                ``builtin`` for the built-in tasks generated from `seed`.
            format: record format; ``auto`` detects it per row.
            name: HF dataset configuration name (hub ids only).
            split: HF dataset split to train on (hub ids only).
            val_path: validation data (same sources as `path`); wins over `val_fraction`.
            val_split: HF dataset split to validate on (hub ids); with ``path: builtin``,
                ``heldout`` (the default) or ``train``: unseen problems of the training split,
                apart from the held-out problems that evaluations score (any whose prompt the
                training data holds, `extra_paths` included, is dropped).
            val_fraction: hold out this fraction of `path` (a seeded shuffle) for validation.
            tasks: built-in tasks to generate when ``path: builtin``: names, or mappings of a
                ``name`` and constructor options (``{name: math_word, think: true}``).
            num_train_per_task: built-in training records per task.
            num_val_per_task: built-in validation records per task (from the held-out split).
            seed: seeds generation, the validation split and the shuffle of every epoch.
            tokenizer_name: tokenizer path / hub id / ``builtin`` (the CLI links it to the model's).
            chat_template: replaces the tokenizer's own chat template (unset keeps it): a family
                name (``chatml``, ``llama3``, ``qwen2.5``, ``qwen3``, ``deepseek_r1``, ``gemma``,
                ``mistral``, ``phi3``; its special tokens must be tokens of the tokenizer), a
                ``.jinja`` file, or Jinja text.
            max_length: longest example in tokens; longer ones follow `truncation`.
            train_on: ``assistant`` trains on every assistant turn only; ``all`` on every token.
            multiturn: for templates that render earlier turns differently once later turns
                follow (Qwen3, DeepSeek-R1 drop earlier reasoning): ``per_turn`` trains every
                assistant turn against the history as rendered at that turn (one example per
                turn, turns rendered alike share one); ``last`` keeps only the example of the
                whole conversation. History-stable templates give one example either way.
            truncation: ``right`` cuts, ``drop`` drops (counted), ``error`` raises.
            on_bad_record: ``error`` stops at the first bad row; ``skip`` counts and reports it.
            packing: pack examples best-fit-decreasing into rows of at most `max_length` tokens and
                concatenate ``max_tokens // max_length`` randomly drawn rows into one padding-free
                micro-batch (a fresh draw every epoch).
            max_tokens: token budget of one packed micro-batch.
            layout: packed micro-batch layout: ``flat`` (one row, no padding) or ``rows`` (one
                row per packed row, shorter rows end in filler); ``auto`` takes the model's
                (`connect`: ``flat`` when its attention skips cross-document work, i.e. varlen,
                flash, flex), ``rows`` when none is connected.
            pad_to_budget: pad every packed micro-batch to the same shape (``flat``:
                ``[1, max_tokens]``, ``rows``: ``[max_tokens // max_length, max_length]``) and
                `cu_seqlens` to a fixed length, so torch.compile compiles once (and FP8 matmuls see
                token counts divisible by 16 when `max_tokens` is); ``null`` takes the model's
                (`connect`: on with ``compile: true`` or ``fp8``). Filler tokens count as padding.
            batch_size: examples per padded micro-batch when ``packing: false``.
            num_workers: DataLoader worker processes.
            curation: curation stages applied to the training records after loading, before
                tokenizing (filters, dedup, scored / embedded budgeted selection; see
                `esft.curation.pipeline`); the report is printed and logged to TensorBoard.
            curriculum: a scorer spec (``{name: length}``, ``{name: ifd, ...}``, optionally
                ``descending: true``): train easy to hard, lowest score first, in order every
                epoch instead of shuffled (see `esft.curation.curriculum`).
            extra_paths: more training sources (files, directories or hub ids, read with
                `format` and `split`) added to `path`'s training records, e.g. rejection-sampled
                data beside the built-in tasks; validation still comes from `path` / `val_path`.
            sources: a weighted mixture instead of `path`: a list of paths, or of mappings with a
                ``path`` and optionally ``weight`` (share of the trained tokens, or examples with
                `mix_by`), ``epochs`` (passes, when no source has a weight), ``max_examples``,
                ``format``, ``name``, ``split``, ``val_path``, ``val_split``, ``val_fraction``
                and ``label`` (see `esft.data.mixture`). Each source's held-out loss is logged as
                ``val/<label>/loss`` beside the overall ``val/loss``; the report shows each
                source's realised share.
            mix_by: what mixture weights are shares of: ``tokens`` (trained tokens) or ``examples``.
            cache: tokenize file and hub sources once into the cache directory and memory-map them
                (`esft.data.store`: keyed by the source files, tokenizer, template and the options
                above, so a changed option prepares again and an unchanged one starts at once).
                Built-in tasks, curation and curricula keep their examples in memory.
            cache_dir: where prepared sources live (default ``$ESFT_DATA_CACHE``, else
                ``~/.cache/esft/data``).
            num_proc: worker processes that prepare a source (default: the CPU cores available).
        """
        super().__init__()
        if packing and max_length > max_tokens:
            raise ValueError(f"max_length ({max_length}) must not exceed max_tokens ({max_tokens}) when packing")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if path == BUILTIN and val_split not in (None, "heldout", "train"):
            raise ValueError(f"val_split={val_split!r}: with path: builtin it is 'heldout' (the default) "
                             "or 'train' (unseen problems of the training split)")
        self.sources = parse_sources(sources) if sources else None
        if self.sources and (path != BUILTIN or extra_paths or val_path):
            raise ValueError("data.sources replaces data.path, extra_paths and val_path: set one or the other")
        if self.sources and (not cache or self._stages_replaced() or curation or curriculum):
            raise ValueError(f"data.sources needs the example cache (cache: true, not {type(self).__name__} "
                             "if it keeps examples in memory) and neither curation nor curriculum")
        self.save_hyperparameters()
        self.hp = self.hparams
        self.tasks = tasks if tasks is not None else ["arithmetic", "reverse_words"]
        self.train_examples: list[dict[str, Any]] = []
        self.val_examples: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []  # untokenized, for generation (`predict`)
        self._tokenizer = None
        self.data_report: dict[str, Any] = {"sources": []}  # also written to the run directory
        self._val_groups: list[tuple[str, int]] | None = None  # (source label, val examples) of a mixture
        self._stores: dict[tuple[str, str, str, str | None], ExampleStore] = {}
        self.needs = PackingNeeds()  # the model's, once `connect` gives them

    def connect(self, needs: PackingNeeds) -> None:
        """Take the model's packing needs (the objective calls this from its `setup`, before any
        loader is built); `layout` and `pad_to_budget`, when set, still win."""
        self.needs = needs

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hp.tokenizer_name or BUILTIN)
            if self.hp.chat_template:
                self._tokenizer.chat_template = resolve_chat_template(self.hp.chat_template, self._tokenizer)
        return self._tokenizer

    # ---- stage 1: records ----------------------------------------------------------------
    def task_records(self, split: str, n: int) -> list[dict[str, Any]]:
        """`n` records of each built-in task in `tasks`, from its ``train`` or ``heldout`` split."""
        return [r for spec in self.tasks for r in build_task(spec).generate(n, seed=self.hp.seed, split=split)]

    def read_records(self, source: str, split: str) -> list[dict[str, Any]]:
        """The records of one file, directory or hub source (`split`: the hub split), with its
        rows read and skipped reported."""
        records, stats = load_records(source, self.hp.format, self.hp.on_bad_record, split=split, name=self.hp.name)
        self.report_load(source, stats)
        return records

    def load_records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The training and validation records: built-in tasks, or `path` with its validation
        data (`val_path` / `val_split`, else `val_fraction` of it held out by a seeded shuffle);
        then `extra_paths` added to the training records."""
        hp = self.hp
        if hp.path == BUILTIN:
            train = self.task_records("train", hp.num_train_per_task)
            val = self.builtin_val_records()
        else:
            train = self.read_records(hp.path, hp.split)
            if hp.val_path or hp.val_split:
                val = self.read_records(hp.val_path or hp.path, hp.val_split or hp.split)
            elif hp.val_fraction > 0:
                kept, held = held_out(len(train), hp.val_fraction, hp.seed)
                train, val = [train[i] for i in kept], [train[i] for i in held]
            else:
                val = []
        for source in hp.extra_paths or []:
            train = train + self.read_records(source, hp.split)
        if hp.path == BUILTIN and hp.val_split == "train" and val:  # extra data may hold unseen problems too
            seen = {prompt_key(r) for r in train}
            kept = [r for r in val if prompt_key(r) not in seen]
            if len(kept) < len(val):
                rank_zero_info(f"[data] validation: {len(val) - len(kept)} of {len(val)} problems dropped "
                               "(their prompts are in the training data)")
            val = kept
        return train, val

    def builtin_val_records(self) -> list[dict[str, Any]]:
        """`num_val_per_task` validation problems per built-in task: from the held-out split (the
        default), or with ``val_split: train`` from the training split past the `num_train_per_task`
        trained on, so that a run can select its checkpoint on data apart from the held-out
        problems it is evaluated on (`esft.callbacks.TaskEvaluation`, ``esft pipeline``'s eval)."""
        hp = self.hp
        if hp.num_val_per_task <= 0:
            return []
        if hp.val_split in (None, "heldout"):
            return self.task_records("heldout", hp.num_val_per_task)
        n = hp.num_train_per_task
        return [r for spec in self.tasks
                for r in build_task(spec).generate(n + hp.num_val_per_task, seed=hp.seed, split="train")[n:]]

    def report_load(self, source: str, stats: LoadStats, note: str = "") -> None:
        """Print, log and record one source's rows read and skipped (a `read_records` that reads
        another format reports through it)."""
        formats = ", ".join(f"{k}: {v}" for k, v in stats.formats.items())
        msg = f"[data] {source}: {stats.read} rows read ({formats}{'; ' + note if note else ''})"
        if stats.num_skipped:
            reasons = "; ".join(f"{n} x {r}" for r, n in stats.skipped.most_common())
            msg += f", {stats.num_skipped} skipped under on_bad_record=skip ({reasons}); e.g. " + " | ".join(stats.examples[:3])
        rank_zero_info(msg)
        self.data_report["sources"].append({
            "source": source, "read": stats.read, "formats": dict(stats.formats), "skipped": stats.num_skipped,
            "skip_reasons": dict(stats.skipped), "skip_examples": list(stats.examples),
        })
        self._write_report()

    # ---- stage 2: examples ---------------------------------------------------------------
    def to_examples(self, records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        """`records` tokenized and prompt-masked (`esft.data.tokenize`), with the counts reported
        under `label` (``train``, ``val``)."""
        show = len(records) >= 20_000 and (self.trainer is None or self.trainer.is_global_zero)
        examples, stats = tokenize_records(
            records, self.tokenizer, self.hp.max_length, self.hp.train_on, self.hp.truncation, progress=show,
            multiturn=self.hp.multiturn,
        )
        self._report_tokenize(label, stats)
        return examples

    def _report_tokenize(self, label: str, s: TokenizeStats) -> None:
        msg = (
            f"[data] {label}: {s.examples} examples, {s.tokens} tokens ({s.trained_tokens} trained), "
            f"{s.truncated} truncated to max_length={self.hp.max_length}"
        )
        if s.system_not_rendered:
            msg += f", {s.system_not_rendered} records' system prompt not in the rendered text (the chat template leaves it out)"
        if s.num_dropped:
            msg += ", dropped: " + "; ".join(f"{n} x {r}" for r, n in s.dropped.most_common())
        rank_zero_info(msg)
        counts = {"examples": s.examples, "tokens": s.tokens, "trained_tokens": s.trained_tokens,
                  "truncated": s.truncated, "dropped": s.num_dropped}
        self.data_report[label] = {**counts, "max_length": self.hp.max_length, "drop_reasons": dict(s.dropped),
                                   "system_not_rendered": s.system_not_rendered}
        self._write_report()
        if label == "train":  # every source is loaded by now
            sources = self.data_report["sources"]
            counts = {"rows_read": sum(x["read"] for x in sources), "skipped": sum(x["skipped"] for x in sources), **counts}
        prefix = "data/" if label == "train" else f"data/{label}/"
        log_to_all(self.trainer, {prefix + k: float(v) for k, v in counts.items()}, 0)

    def _write_report(self) -> None:
        """`data_report` to ``data_report.json`` in the run directory (global rank 0)."""
        if self.trainer is None:
            return
        directory = self.trainer.log_dir or self.trainer.default_root_dir  # log_dir: every rank must ask
        if self.trainer.is_global_zero:
            path = Path(directory) / "data_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.data_report, indent=2) + "\n", encoding="utf-8")

    # ---- prepared sources (`esft.data.store`) ----------------------------------------------
    def _stages_replaced(self) -> bool:
        """Whether this class overrides a stage that the example cache would skip."""
        return any(getattr(type(self), name) is not getattr(SFTDataModule, name) for name in self.RECORD_STAGES)

    def _uses_store(self) -> bool:
        hp = self.hp
        return (hp.cache and not self._stages_replaced() and (self.sources is not None or hp.path != BUILTIN)
                and not (hp.curation or hp.curriculum))

    def _source_list(self) -> list[Source]:
        """The training sources: `sources`, or `path` (with its validation options) and `extra_paths`."""
        if self.sources:
            return self.sources
        hp = self.hp
        common = dict(format=hp.format, name=hp.name, split=hp.split)
        main = Source(path=hp.path, label="train", val_path=hp.val_path, val_split=hp.val_split,
                      val_fraction=hp.val_fraction, **common)
        return [main, *(Source(path=p, label=f"extra{i}", val_fraction=0.0, **common) for i, p in enumerate(hp.extra_paths or []))]

    @staticmethod
    def _val_source(source: Source) -> tuple[str, str] | None:
        """The ``(path, split)`` of a source's own validation data, if it has any."""
        if source.val_path or source.val_split:
            return source.val_path or source.path, source.val_split or source.split
        return None

    def _store(self, source: Source, path: str, split: str) -> ExampleStore:
        key = (path, split, source.format, source.name)
        if key not in self._stores:
            hp = self.hp
            options = StoreOptions(format=source.format, on_bad_record=hp.on_bad_record, max_length=hp.max_length,
                                   train_on=hp.train_on, multiturn=hp.multiturn, truncation=hp.truncation,
                                   name=source.name, split=split)
            show = self.trainer is None or self.trainer.is_global_zero
            self._stores[key] = prepare_store(path, self.tokenizer, options, hp.cache_dir, hp.num_proc, progress=show)
        return self._stores[key]

    def _report_store(self, store: ExampleStore) -> None:
        """The load report of a prepared source (every rank calls it: the report file asks the
        trainer for the run directory, a collective)."""
        meta, load = store.meta, store.meta["load"]
        stats = LoadStats(read=load["read"], skipped=Counter(load["skip_reasons"]), formats=Counter(load["formats"]),
                          examples=load["skip_examples"])
        self.report_load(meta["source"], stats, f"prepared in {meta['seconds']} s by {meta['num_proc']} "
                                                 f"processes, cached in {store.directory}")

    def prepare_data(self) -> None:
        """Prepare (tokenize and cache) every file and hub source, once per node (Lightning calls
        this on one process per node before `setup`; the other ranks wait, then map the entries)."""
        if self._uses_store():
            for source in self._source_list():
                self._store(source, source.path, source.split)
                if (val := self._val_source(source)) is not None:
                    self._store(source, *val)

    def _split(self, source: Source) -> tuple[ExampleStore, np.ndarray, ExampleStore | None, np.ndarray]:
        """A source's store and training example indices, and its validation store and indices:
        its own validation data, or `val_fraction` of its records held out by the same seeded
        shuffle as in-memory data (the same split, so cached and uncached runs see the same data)."""
        store = self._store(source, source.path, source.split)
        if (val := self._val_source(source)) is not None:
            val_store = self._store(source, *val)
            return store, np.arange(len(store)), val_store, np.arange(len(val_store))
        fraction = source.val_fraction if source.val_fraction is not None else self.hp.val_fraction
        if fraction <= 0:
            return store, np.arange(len(store)), None, np.zeros(0, np.int64)
        kept, held = held_out(store.num_records, fraction, self.hp.seed)
        return store, record_examples(store, kept), store, record_examples(store, held)

    def _setup_stores(self) -> None:
        hp = self.hp
        sources = self._source_list()
        train, val, amounts = [], [], []
        for i, source in enumerate(sources):
            store, train_index, val_store, val_index = self._split(source)
            for used in {store.directory: store, **({val_store.directory: val_store} if val_store else {})}.values():
                self._report_store(used)
            if source.max_examples is not None and len(train_index) > source.max_examples:
                keep = np.random.default_rng([hp.seed, i]).choice(len(train_index), source.max_examples, replace=False)
                train_index = train_index[np.sort(keep)]
            train.append((store, train_index))
            amounts.append(store.trained_tokens[train_index].astype(np.float64) if hp.mix_by == "tokens"
                           else np.ones(len(train_index)))
            if val_store is not None and len(val_index):
                val.append((source.label, val_store, val_index))
        if self.sources:
            chosen = mix(amounts, sources, hp.seed)
            train = [(store, index[c]) for (store, index), c in zip(train, chosen)]
            self._report_mixture(sources, train, [float(a.sum()) for a in amounts])
        self.train_examples = ExampleView(train)
        self.val_examples = ExampleView([(store, index) for _, store, index in val]) if val else []
        self._val_groups = [(label, len(index)) for label, _, index in val] if self.sources and val else None
        self._report_tokenize("train", self._view_stats(train, sources))
        if not len(self.train_examples):
            raise DataFormatError(f"{sources[0].path}: no training examples left after tokenization (see the report above)")
        if val:
            self._report_tokenize("val", self._view_stats([(st, ix) for _, st, ix in val], []))

    def _view_stats(self, parts: list[tuple[ExampleStore, np.ndarray]], sources: list[Source]) -> TokenizeStats:
        """The tokenize counts of the examples `parts` (truncated and dropped: those of `sources`)."""
        stats = TokenizeStats()
        for store, index in parts:
            stats.examples += len(index)
            stats.tokens += int(store.lengths[index].sum())
            # labels: the next-token targets plus each example's first token where it is trained
            stats.trained_tokens += int(store.trained_tokens[index].sum()) + int(store.trained[store.offsets[index]].sum())
        for source in sources:
            meta = self._store(source, source.path, source.split).meta["tokenize"]
            stats.truncated += meta["truncated"]
            stats.dropped += Counter(meta["dropped"])
            stats.system_not_rendered += meta["system_not_rendered"]
        return stats

    def _report_mixture(self, sources: list[Source], parts: list[tuple[ExampleStore, np.ndarray]],
                        available: list[float]) -> None:
        """Each source's realised share of the mixture (of `mix_by`), printed, logged and reported."""
        counts = [float(st.trained_tokens[ix].sum()) if self.hp.mix_by == "tokens" else float(len(ix)) for st, ix in parts]
        total = sum(counts) or 1.0
        weights = [s.weight for s in sources]
        rows = []
        for source, (store, index), count, have, weight in zip(sources, parts, counts, available, weights):
            rows.append({"label": source.label, "path": source.path, "weight": weight, "epochs_given": source.epochs,
                         "target_share": weight / sum(weights) if weight is not None else None,
                         "share": count / total, "examples": len(index), self.hp.mix_by: count,
                         "epochs": count / have if have else 0.0})
        self.data_report["mixture"] = {"mix_by": self.hp.mix_by, "sources": rows}
        lines = [f"[data] mixture by {self.hp.mix_by}:"] + [
            f"  {r['label']}: {r['share']:.1%} of the mixture"
            + (f" (weight {r['target_share']:.1%})" if r["target_share"] is not None else "")
            + f", {r['examples']} examples, {r['epochs']:.2f} passes" for r in rows]
        rank_zero_info("\n".join(lines))
        self._write_report()
        log_to_all(self.trainer, {f"data/mixture/{r['label']}/share": r["share"] for r in rows}, 0)

    def _val_records_of_stores(self) -> list[dict[str, Any]]:
        """The validation records of the prepared sources (read again; for ``esft predict``)."""
        records = []
        for source in self._source_list():
            if (val := self._val_source(source)) is not None:
                records += self.read_records(val[0], val[1])
                continue
            fraction = source.val_fraction if source.val_fraction is not None else self.hp.val_fraction
            if fraction > 0:
                rows = self.read_records(source.path, source.split)
                records += [rows[i] for i in held_out(len(rows), fraction, self.hp.seed)[1]]
        return records

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples or self.val_examples:
            return
        if self._uses_store():
            self._setup_stores()
            return
        hp = self.hp
        train, val = self.load_records()
        if hp.curation or hp.curriculum:
            from esft.curation import prepare

            train = prepare(train, hp.curation, hp.curriculum, hp.seed, self.trainer.logger if self.trainer else None)
        self.train_examples = self.to_examples(train, "train")
        if not self.train_examples:
            raise DataFormatError(f"{hp.path}: no training examples left after tokenization (see the report above)")
        self.val_examples = self.to_examples(val, "val") if val else []
        self.val_records = val

    # ---- stage 3: batches ----------------------------------------------------------------
    def units(self, examples: Sequence[dict[str, Any]]) -> tuple[list[list[int]], int]:
        """The units of `examples` (lists of example indices that travel together) and units per
        micro-batch: packed rows of <= max_length tokens, max_tokens // max_length to a
        micro-batch; or single examples, batch_size to a micro-batch."""
        if self.hp.packing:
            lengths = example_lengths(examples)
            per_batch = self.hp.max_tokens // self.hp.max_length
            if self.hp.curriculum and examples is self.train_examples:
                from esft.curation import ordered_rows

                return ordered_rows(lengths.tolist(), self.hp.max_length), per_batch
            if examples is self.val_examples and self._val_groups:  # each source packed alone
                rows, start = [], 0
                for _, n in self._val_groups:
                    rows += [[start + i for i in row] for row in best_fit_decreasing(lengths[start : start + n], self.hp.max_length)]
                    start += n
                return rows, per_batch
            return best_fit_decreasing(lengths, self.hp.max_length), per_batch
        return [[i] for i in range(len(examples))], self.hp.batch_size

    def _unit_groups(self, examples: Sequence[dict[str, Any]], units: list[list[int]]) -> list[tuple[str, int]] | None:
        """``(source label, units)`` runs of the validation units of a mixture, else None."""
        if examples is not self.val_examples or not self._val_groups:
            return None
        ends = np.cumsum([n for _, n in self._val_groups])
        source = np.searchsorted(ends, [unit[0] for unit in units], side="right")
        return [(label, int((source == g).sum())) for g, (label, _) in enumerate(self._val_groups)]

    def batch_layout(self) -> Layout:
        """The packed layout: the `layout` option, else the connected model's."""
        return self.hp.layout if self.hp.layout != "auto" else self.needs.layout

    def pads_to_budget(self) -> bool:
        """Whether packed micro-batches get one fixed shape: `pad_to_budget`, else the connected
        model's need for static shapes."""
        return self.hp.pad_to_budget if self.hp.pad_to_budget is not None else self.needs.static_shapes

    def collate(self, units: list[list[int]], per_batch: int) -> Collate:
        """The function that turns a micro-batch (its units, as lists of examples) into tensors,
        with the step's ``step_tokens``; `units` and `per_batch` size the fixed shapes."""
        if not self.hp.packing:
            collate = partial(collate_padded, pad_token_id=self.tokenizer.pad_token_id)
        elif self.pads_to_budget():
            segments = max_segments(units, per_batch, self.hp.max_tokens, self.hp.max_length)
            collate = partial(collate_fixed, layout=self.batch_layout(), max_tokens=self.hp.max_tokens,
                              max_length=self.hp.max_length, num_segments=segments)
        else:
            collate = partial(collate_packed, layout=self.batch_layout())
        return partial(with_step_tokens, collate=collate)

    def _progress(self) -> tuple[int, int]:
        """The trainer's position in the training data: the epoch, and its batches trained on."""
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def row_length(self) -> int:
        """Capacity of a packed row in tokens."""
        return self.hp.max_length

    def unit_counts(self, examples: Sequence[dict[str, Any]], units: list[list[int]]) -> list[int]:
        """What each unit adds to its optimizer step's loss denominator: its trained tokens."""
        tokens = example_trained_tokens(examples).tolist()
        return [sum(tokens[i] for i in unit) for unit in units]

    def loader(self, examples: Sequence[dict[str, Any]], train: bool) -> DataLoader:
        """The DataLoader of a split: `units` drawn into micro-batches by a rank-aware sampler
        (shuffled every epoch and resumable mid-epoch when `train`), put together by `collate`."""
        units, per_batch = self.units(examples)
        trainer = self.trainer
        sampler = ResumableBatchSampler(
            len(units),
            per_batch,
            shuffle=train and not self.hp.curriculum,
            seed=self.hp.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            # each micro-batch carries its optimizer step's trained tokens: the loss is the
            # step's token mean over all micro-batches and ranks (`esft.objectives.base`)
            unit_tokens=self.unit_counts(examples, units) if train else None,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            groups=self._unit_groups(examples, units),
        )
        if train and self.hp.packing:
            total = int(example_lengths(examples).sum())
            rank_zero_info(
                f"[data] packed {len(examples)} examples into {len(units)} rows of <= {self.row_length()} tokens "
                f"({total / (len(units) * self.row_length()):.1%} full), {per_batch} rows per micro-batch "
                f"of <= {self.hp.max_tokens} tokens: {len(sampler)} micro-batches per epoch"
            )
        kwargs = dict(collate_fn=self.collate(units, per_batch), num_workers=self.hp.num_workers,
                      persistent_workers=self.hp.num_workers > 0)
        if train:
            return ResumableLoader(PackedRows(examples, units), batch_sampler=sampler, progress=self._progress, **kwargs)
        return DataLoader(PackedRows(examples, units), batch_sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_examples, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.val_examples, train=False) if self.val_examples else []

    def test_dataloader(self) -> DataLoader | list:
        """The validation data (``esft test`` reports ``test/loss`` on it)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Validation records in batches of `batch_size`, for ``esft predict`` (generation)."""
        if not self.val_records and self._uses_store():
            self.val_records = self._val_records_of_stores()
        if not self.val_records:
            raise ValueError("esft predict generates for the validation records: set data.val_path, val_fraction or use builtin tasks")
        return DataLoader(self.val_records, batch_size=self.hp.batch_size, collate_fn=list)
