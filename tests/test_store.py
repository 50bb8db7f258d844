"""The prepared-example cache (`esft.data.store`) and weighted mixtures (`esft.data.mixture`):
hits and misses by fingerprint, cached batches equal to in-memory ones, the same entry whatever
the worker count, errors naming the row from a worker, one preparer at a time, and mixture
shares on 100k examples."""

import json
import threading

import lightning as L
import numpy as np
import pytest
import torch

import esft.data.store as store_module
from esft.data import SFTDataModule
from esft.data.mixture import mix, parse_sources
from esft.data.records import DataFormatError
from esft.data.store import ExampleStore, StoreOptions, prepare_store
from esft.data.tasks.chats import write_chats
from esft.objectives import SFTModule

from conftest import TINY


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", 300, seed=0)


def count_preparations(monkeypatch) -> list[str]:
    """The sources `prepare_store` actually tokenizes from now on (cache misses)."""
    calls = []
    write = store_module._write_entry

    def counted(tmp, source, *args, **kwargs):
        calls.append(source)
        return write(tmp, source, *args, **kwargs)

    monkeypatch.setattr(store_module, "_write_entry", counted)
    return calls


def test_the_cache_hits_on_the_same_inputs_and_misses_on_any_change(tmp_path, chats, tokenizer, monkeypatch):
    copy = tmp_path / "copy.jsonl"  # changed below
    copy.write_bytes(chats.read_bytes())
    chats = copy
    calls = count_preparations(monkeypatch)
    options = StoreOptions(max_length=128)
    first = prepare_store(str(chats), tokenizer, options, tmp_path, num_proc=1, progress=False)
    again = prepare_store(str(chats), tokenizer, options, tmp_path, num_proc=1, progress=False)
    assert len(calls) == 1 and again.directory == first.directory
    different = [
        prepare_store(str(chats), tokenizer, StoreOptions(max_length=96), tmp_path, 1, False),
        prepare_store(str(chats), tokenizer, StoreOptions(max_length=128, train_on="all"), tmp_path, 1, False),
        prepare_store(str(chats), tokenizer, StoreOptions(max_length=128, multiturn="last"), tmp_path, 1, False),
    ]
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = tokenizer.chat_template.replace("'\n'", "'\n\n'")
    assert templated.chat_template != tokenizer.chat_template
    different.append(prepare_store(str(chats), templated, options, tmp_path, 1, False))
    with chats.open("a") as f:  # the source file changes
        f.write(json.dumps({"prompt": "one more", "response": "row"}) + "\n")
    different.append(prepare_store(str(chats), tokenizer, options, tmp_path, 1, False))
    assert len(calls) == 6
    assert len({d.directory for d in [first, *different]}) == 6
    assert different[-1].num_records == first.num_records + 1
    assert different[0].lengths.max() <= 96 < first.lengths.max()


def test_the_tokenizer_fingerprint_ignores_truncation_and_padding_state():
    """A fast tokenizer keeps the truncation and padding of its last call; the fingerprint (and so
    the cache entry) must not change with it, or the cache misses depending on what ran before."""
    from esft.data.store import tokenizer_fingerprint
    from esft.models.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    before = tokenizer_fingerprint(tok)
    tok(["hello world"], truncation=True, max_length=8)
    tok(["hello world"], padding="max_length", max_length=8)
    assert tokenizer_fingerprint(tok) == before
    other = load_tokenizer("builtin")
    other.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other) != before


def test_cached_batches_equal_in_memory_batches(tmp_path, chats):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) + "\n" for i in range(20)))
    options = dict(path=str(chats), val_fraction=0.1, extra_paths=[str(extra)], max_length=128, max_tokens=512,
                   seed=3)
    memory = SFTDataModule(cache=False, **options)
    cached = SFTDataModule(cache_dir=str(tmp_path / "cache"), num_proc=2, **options)
    for dm in (memory, cached):
        dm.prepare_data()
        dm.setup("fit")
    assert isinstance(cached.train_examples[0]["input_ids"], list)
    assert [cached.train_examples[i] for i in range(len(cached.train_examples))] == memory.train_examples
    assert [cached.val_examples[i] for i in range(len(cached.val_examples))] == memory.val_examples
    for split in ("train", "val"):
        assert cached.data_report[split]["trained_tokens"] == memory.data_report[split]["trained_tokens"]
    for loader in ("train_dataloader", "val_dataloader"):
        batches = [list(getattr(dm, loader)()) for dm in (memory, cached)]
        assert len(batches[0]) == len(batches[1]) > 1
        for a, b in zip(*batches):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    assert {r["id"] for r in cached.predict_dataloader().dataset} == {r["id"] for r in memory.val_records}


def test_the_entry_is_the_same_for_one_or_two_worker_processes(tmp_path, chats, tokenizer):
    one = prepare_store(str(chats), tokenizer, StoreOptions(max_length=128), tmp_path / "a", num_proc=1, progress=False)
    store_module_chunk = store_module.CHUNK_ROWS
    store_module.CHUNK_ROWS = 64  # several chunks in flight
    try:
        two = prepare_store(str(chats), tokenizer, StoreOptions(max_length=128), tmp_path / "b", num_proc=2,
                            progress=False)
    finally:
        store_module.CHUNK_ROWS = store_module_chunk
    for name in ("tokens", "trained", "offsets", "trained_tokens", "record", "task"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.meta["tokenize"] == two.meta["tokenize"] and one.tasks == two.tasks


def test_a_bad_row_in_a_worker_is_named_and_leaves_no_entry(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_ROWS", 4)
    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(10)]
    rows[6] = json.dumps({"prompt": "q6", "response": ""})
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=rf"^{data}:7: field 'response' is empty"):
        prepare_store(str(data), tokenizer, StoreOptions(), tmp_path / "cache", num_proc=2, progress=False)
    assert not list((tmp_path / "cache").glob("*/meta.json")) and not list((tmp_path / "cache").glob("*.tmp-*"))
    skipped = prepare_store(str(data), tokenizer, StoreOptions(on_bad_record="skip"), tmp_path / "cache", 2, False)
    assert skipped.num_records == 9 and skipped.meta["load"]["skipped"] == 1
    assert skipped.meta["load"]["skip_examples"] == [f"{data}:7: field 'response' is empty"]


def test_parquet_streams_to_the_same_examples(tmp_path, chats, tokenizer):
    import pandas as pd

    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    parquet = tmp_path / "chats.parquet"
    pd.DataFrame(rows).to_parquet(parquet, row_group_size=50)
    a = prepare_store(str(chats), tokenizer, StoreOptions(max_length=128), tmp_path, 1, False)
    b = prepare_store(str(parquet), tokenizer, StoreOptions(max_length=128), tmp_path, 1, False)
    assert a.directory != b.directory
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.trained, b.trained)


def test_concurrent_preparers_prepare_once_and_stale_work_is_removed(tmp_path, chats, tokenizer, monkeypatch):
    calls = count_preparations(monkeypatch)
    digest, _ = store_module.fingerprint(str(chats), tokenizer, StoreOptions())
    stale = tmp_path / f"{digest}.tmp-99999"  # a killed preparation's leftovers
    stale.mkdir(parents=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_store(str(chats), tokenizer, StoreOptions(),
                                                                             tmp_path, 1, False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({r.directory for r in results}) == 1 and not stale.exists()
    assert isinstance(ExampleStore(results[0].directory), ExampleStore)


def test_mixture_shares_are_within_one_percent_of_their_weights_at_100k():
    rng = np.random.default_rng(0)
    amounts = [rng.integers(5, 400, 50_000).astype(float), rng.integers(5, 60, 40_000).astype(float),
               rng.integers(50, 900, 10_000).astype(float)]
    sources = parse_sources([{"path": "a.jsonl", "weight": 5}, {"path": "b.jsonl", "weight": 3},
                             {"path": "c.jsonl", "weight": 2}])
    chosen = mix(amounts, sources, seed=0)
    realised = np.array([a[c].sum() for a, c in zip(amounts, chosen)])
    assert np.allclose(realised / realised.sum(), [0.5, 0.3, 0.2], atol=0.01)
    assert abs(realised.sum() / sum(a.sum() for a in amounts) - 1) < 0.01  # as large as the sources together
    assert len(chosen[1]) > len(amounts[1])  # the short-example source is repeated
    assert len(np.unique(chosen[0])) == len(chosen[0]) < len(amounts[0])  # the long-example one is subsampled
    epochs = mix(amounts, parse_sources(["a.jsonl", {"path": "b.jsonl", "epochs": 2.5}, {"path": "c.jsonl", "epochs": 0.5}]), 0)
    assert len(epochs[0]) == 50_000 and np.array_equal(epochs[0], np.arange(50_000))
    assert abs(amounts[1][epochs[1]].sum() / amounts[1].sum() - 2.5) < 1e-3
    assert abs(amounts[2][epochs[2]].sum() / amounts[2].sum() - 0.5) < 1e-3


@pytest.mark.parametrize("spec,message", [
    ([{"path": "a", "weight": 1}, {"path": "b"}], "either every source has a weight"),
    ([{"path": "a", "weight": 1}, {"path": "b", "weight": 1, "epochs": 2}], "weights or epochs"),
    ([{"path": "a", "wieght": 1}], r"unknown field\(s\) \['wieght'\]"),
    ([{"path": "x/a.jsonl"}, {"path": "y/a.jsonl"}], r"labels must be unique, \['a'\]"),
])
def test_bad_mixtures_are_refused_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sources(spec)


class Metrics(L.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_mixture_logs_each_sources_validation_loss_and_its_realised_share(tmp_path):
    from esft.data.tasks import get_task

    sources = []
    for name, weight in (("reverse_words", 3), ("arithmetic", 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in get_task(name).generate(60, seed=0)))
        sources.append({"path": str(path), "weight": weight, "val_fraction": 0.2})
    dm = SFTDataModule(sources=sources, max_length=64, max_tokens=128, cache_dir=str(tmp_path / "cache"))
    metrics = Metrics()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[metrics],
                        num_sanity_val_steps=0, val_check_interval=1, default_root_dir=str(tmp_path))
    trainer.fit(SFTModule(model_config=TINY["llama"], loss_chunk_size=16), dm)
    shares = {r["label"]: r["share"] for r in dm.data_report["mixture"]["sources"]}
    assert shares["reverse_words"] == pytest.approx(0.75, abs=0.03) and shares["arithmetic"] == pytest.approx(0.25, abs=0.03)
    m = metrics.metrics
    assert {"val/loss", "val/reverse_words/loss", "val/arithmetic/loss"} <= set(m)
    assert m["val/reverse_words/loss"] != m["val/arithmetic/loss"]
    # the overall loss is the token-weighted mean of the sources' losses
    tokens = {label: sum(int(b["labels"][..., 1:].ne(-100).sum()) for b in dm.val_dataloader() if b["source"] == label)
              for label in shares}
    weighted = sum(m[f"val/{k}/loss"] * n for k, n in tokens.items()) / sum(tokens.values())
    assert m["val/loss"] == pytest.approx(weighted, rel=1e-4)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_the_stored_trained_token_counts_are_the_examples_next_token_targets(tmp_path, chats, tokenizer, train_on):
    from esft.data.packing import trained_tokens

    store = prepare_store(str(chats), tokenizer, StoreOptions(max_length=128, train_on=train_on), tmp_path, 1, False)
    assert store.trained_tokens.tolist() == [trained_tokens(store[i]) for i in range(len(store))]
