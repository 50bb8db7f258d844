"""Curation parts on crafted inputs with known answers: planted duplicates, wrong answers,
contamination, budgets, and selectors on point sets whose right picks are obvious."""

import math

import pytest
import torch

from esft.curation import Budget, Pipeline, build_scorer, curate
from esft.curation.base import token_lengths
from esft.curation.filters import (
    Decontaminate,
    DegenerateFilter,
    ExactDedup,
    FormatFilter,
    LengthFilter,
    MinHashDedup,
    repeated_ngram_fraction,
    semantic_duplicates,
)
from esft.curation.lm import per_record
from esft.curation.selectors import (
    DeitaSelector,
    KCenterSelector,
    KMeansSelector,
    RandomSelector,
    ThresholdSelector,
    TopKSelector,
)
from esft.data.tasks import build_task
from esft.evaluation.perplexity import perplexity
from esft.models import build_model
from tests.conftest import TINY


def rec(prompt, response, **extra):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], **extra}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path / "cache"))


# ---- filters ---------------------------------------------------------------------------------
def test_exact_dedup_finds_planted_duplicates_and_keeps_first():
    base = [rec(f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(3)]
    base.append(rec("What is 1 - 2?", "-1"))  # differs from "1 + 2" only by the operator: not a duplicate
    planted = [rec(base[i]["messages"][0]["content"].upper() + "  ", base[i]["messages"][1]["content"]) for i in (0, 5, 7)]
    keep = ExactDedup()(base + planted)
    assert keep[: len(base)].all() and not keep[len(base):].any()


def test_minhash_finds_planted_near_duplicates():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
    import random

    rng = random.Random(0)
    originals = [rec("Write: " + " ".join(rng.sample(words, 15)), " ".join(rng.sample(words, 15))) for _ in range(30)]
    near = []
    for r in originals[:10]:  # one word of ~32 changed: Jaccard of char 5-grams stays well above 0.7
        p = r["messages"][0]["content"].split()
        p[-1] = "omega"
        near.append(rec(" ".join(p), r["messages"][1]["content"]))
    keep = MinHashDedup(threshold=0.7, num_perm=128, ngram=5)(originals + near)
    assert keep[:30].all(), "a distinct record was taken for a duplicate"
    assert not keep[30:].any(), f"missed near duplicates: {(keep[30:]).nonzero().flatten().tolist()}"


def test_semantic_duplicates_keep_one_per_tight_group():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 32, generator=g), dim=1)
    x = torch.cat([centers[i] + 1e-3 * torch.randn(4, 32, generator=g) for i in range(6)])
    x = torch.nn.functional.normalize(x, dim=1)
    keep = semantic_duplicates(x, clusters=3, eps=0.01, iterations=10, seed=0)
    assert keep.view(6, 4).sum(1).tolist() == [1] * 6


def test_degenerate_filter():
    records = [rec("q", "a fine answer here"), rec("q", "   "), rec("q", "the cat " * 20),
               rec("q", "!" * 40), rec("q", "42")]
    assert DegenerateFilter()(records).tolist() == [True, False, False, False, True]
    assert repeated_ngram_fraction("a b c a b c".split(), 3) == pytest.approx(1 / 4)


def test_length_filter_chars_and_tokens(tokenizer):
    records = [rec("hi", "x" * n) for n in (1, 10, 100)]
    assert LengthFilter(field="response", min_chars=5, max_chars=50)(records).tolist() == [False, True, False]
    lengths = token_lengths(records, tokenizer)
    mid = int(lengths[1])
    assert LengthFilter(max_tokens=mid)(records).tolist() == [True, True, False]
    assert LengthFilter(min_tokens=mid)(records).tolist() == [False, True, True]


def test_format_filter_json_only_for_named_tasks():
    records = [rec("p", '{"intent": "x"}', task="intent_json"), rec("p", '{"intent": ', task="intent_json"),
               rec("p", "not json", task="arithmetic")]
    assert FormatFilter(json=True, tasks=["intent_json"])(records).tolist() == [True, False, True]
    assert FormatFilter(pattern=r"-?\d+")([rec("p", "12"), rec("p", "12a")]).tolist() == [True, False]


def test_decontaminate_removes_planted_eval_records():
    train = build_task("reverse_words").generate(50, seed=0)
    heldout = build_task("reverse_words").generate(20, seed=0, split="heldout")
    keep = Decontaminate(tasks=["reverse_words"], num_examples=20, ngram=3)(train + heldout[:5])
    assert not keep[50:].any()
    assert keep[:50].float().mean() > 0.8  # 3-grams of short word lists do collide now and then


# ---- scorers ---------------------------------------------------------------------------------
def test_verifier_scores_planted_wrong_answers_zero():
    records = build_task("arithmetic").generate(20, seed=0)
    wrong = [dict(r, messages=[r["messages"][0], {"role": "assistant", "content": str(int(r["answer"]) + 1)}])
             for r in records[:5]]
    scores = build_scorer("verifier")(records + wrong)
    assert scores[:20].tolist() == [1.0] * 20 and scores[20:].tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="not a built-in task"):
        build_scorer("verifier")([rec("p", "r")])
    kept, report = curate(records + wrong, [{"filter": "score", "score": {"name": "verifier"}, "min": 1.0}], log=False)
    assert kept == records and report.stages[0].removed == 5


def test_per_record_loss_matches_perplexity_one_by_one(tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer, model_config=TINY["llama"]).eval()
    records = build_task("arithmetic").generate(6, seed=0) + build_task("reverse_words").generate(6, seed=0)
    packed = per_record(model, tokenizer, records, "loss", max_length=64, max_tokens=256)
    for i, r in enumerate(records):
        assert packed[i].item() == pytest.approx(perplexity(model, tokenizer, [r], max_length=64)["loss"], rel=1e-4)


def test_ifd_is_ratio_of_mean_losses(tokenizer):
    from esft.curation.scorers import single_turn

    records = build_task("reverse_words").generate(5, seed=0)
    spec = {"name": "ifd", "model_config": TINY["llama"], "seed": 3}
    ifd = build_scorer(spec)(records)
    torch.manual_seed(3)
    model = build_model(tokenizer, model_config=TINY["llama"]).eval()
    for i, r in enumerate(records):
        cond = perplexity(model, tokenizer, [single_turn(r)])["loss"]
        alone = perplexity(model, tokenizer, [single_turn(r, instruction=False)])["loss"]
        assert ifd[i].item() == pytest.approx(cond / alone, rel=1e-4)


def test_scores_are_cached_across_selectors(monkeypatch):
    import esft.curation.lm as lm

    calls = []
    real = lm.per_record
    monkeypatch.setattr(lm, "per_record", lambda *a, **k: calls.append(1) or real(*a, **k))
    records = build_task("arithmetic").generate(30, seed=0)
    score = {"name": "ifd", "model_config": TINY["llama"]}
    first, _ = curate(records, [{"select": "top_k", "score": score, "budget": 10}], log=False)
    assert len(calls) == 2  # L(A|Q) and L(A)
    second, _ = curate(records, [{"select": "threshold", "score": score, "max": 100.0, "budget": 20}], log=False)
    assert len(calls) == 2, "the second selector rescored"
    assert len(first) == 10 and len(second) == 20
    curate(records[:-1], [{"select": "top_k", "score": score, "budget": 10}], log=False)
    assert len(calls) == 4, "other records must not hit the cache"


# ---- selectors and budgets ---------------------------------------------------------------------
def test_budget_in_examples_and_tokens():
    lengths = torch.tensor([5, 50, 5, 5, 40, 5])
    assert Budget(examples=3).take([4, 1, 0, 2]).tolist() == [4, 1, 0]
    # 50 fits, 40 would overflow 60 and is skipped, the 5s fill the rest
    taken = Budget(tokens=60, lengths=lengths).take([1, 4, 0, 2, 3, 5])
    assert taken.tolist() == [1, 0, 2] and int(lengths[taken].sum()) <= 60
    records = build_task("arithmetic").generate(200, seed=0)
    kept, _ = curate(records, [{"select": "random", "budget_tokens": 0.25}], log=False)
    from esft.models import load_tokenizer

    tok = load_tokenizer("builtin")
    total = int(token_lengths(records, tok).sum())
    used = int(token_lengths(kept, tok).sum())
    assert 0.2 * total < used <= round(0.25 * total)
    kept, _ = curate(records, [{"select": "random", "budget": 0.1}], log=False)
    assert len(kept) == 20


def test_random_stratified_keeps_proportions():
    records = [{"task": "a"}] * 75 + [{"task": "b"}] * 25
    picked = RandomSelector(stratify_by="task", seed=1)(None, None, Budget(examples=20), records)
    tasks = [records[i]["task"] for i in picked.tolist()]
    assert tasks.count("a") == 15 and tasks.count("b") == 5


def test_top_k_and_threshold():
    s = torch.tensor([0.3, float("nan"), 0.9, 0.1, 0.5])
    assert TopKSelector()(s, None, Budget(examples=2)).tolist() == [2, 4]
    assert TopKSelector(ascending=True)(s, None, Budget(examples=2)).tolist() == [3, 0]
    assert ThresholdSelector(min=0.2, max=0.6)(s, None, Budget(examples=10)).tolist() == [4, 0]


def _clusters(n_per, centers, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(centers, dim=1)
    x = torch.cat([c + noise * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])
    return torch.nn.functional.normalize(x, dim=1)


def test_kcenter_picks_one_point_per_cluster():
    x = _clusters(25, torch.eye(8)[:4])  # 4 far-apart groups of 25
    picked = KCenterSelector(seed=3)(None, x, Budget(examples=4))
    assert sorted((picked // 25).tolist()) == [0, 1, 2, 3]


def test_kmeans_stratified_sampling_follows_cluster_sizes():
    x = torch.cat([_clusters(80, torch.eye(8)[:1]), _clusters(20, torch.eye(8)[1:2], seed=1)])
    picked = KMeansSelector(clusters=2, seed=0)(None, x, Budget(examples=10))
    assert (picked < 80).sum() == 8 and (picked >= 80).sum() == 2


def test_deita_skips_near_duplicates_in_score_order():
    x = _clusters(5, torch.eye(8)[:3], noise=0.001)  # 3 groups of 5 near-identical vectors
    scores = torch.arange(15, dtype=torch.float).flip(0)  # earlier is better
    picked = DeitaSelector(threshold=0.9, block=4)(scores, x, Budget(examples=10))
    assert picked.tolist() == [0, 5, 10]  # the best of each group; the pool runs out of diverse ones
    sims = x[picked] @ x[picked].T
    assert (sims - torch.eye(3)).max() < 0.9


def test_relevance_prefers_target_task():
    pool = build_task("arithmetic").generate(30, seed=0) + build_task("reverse_words").generate(30, seed=0)
    kept, _ = curate(pool, [{"select": "relevance", "embed": {"name": "minilm"}, "budget": 20,
                             "target": {"tasks": ["reverse_words"], "num_examples": 10}}], log=False)
    assert sum(r["task"] == "reverse_words" for r in kept) >= 18


# ---- pipeline ----------------------------------------------------------------------------------
def test_pipeline_report_counts_and_errors():
    records = build_task("arithmetic").generate(40, seed=0)
    kept, report = curate(records + records[:10], [{"filter": "exact_dedup"}, {"select": "random", "budget": 15}], log=False)
    assert [s.removed for s in report.stages] == [10, 25] and len(kept) == 15 and report.output == 15
    assert all(r in records for r in kept)
    with pytest.raises(ValueError, match="unknown filter 'nope'"):
        Pipeline([{"filter": "nope"}])
    with pytest.raises(ValueError, match="needs a `budget`"):
        Pipeline([{"select": "random"}])
    with pytest.raises(ValueError, match="add `score"):
        Pipeline([{"select": "top_k", "budget": 3}])
    with pytest.raises(ValueError, match="bad options"):
        Pipeline([{"filter": "degenerate", "typo": 1}])
    assert math.isclose(report.stages[0].removed / report.stages[0].before, 0.2)


def test_lm_embedding_is_mean_hidden_state_of_each_record(tokenizer):
    from esft.curation.embedders import build_embedder

    records = build_task("arithmetic").generate(4, seed=0) + build_task("reverse_words").generate(4, seed=0)
    vectors = build_embedder({"name": "lm", "model_config": TINY["llama"], "seed": 5})(records + records[:1])
    torch.manual_seed(5)
    model = build_model(tokenizer, model_config=TINY["llama"]).eval()
    for i, r in enumerate(records):
        ids = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        ids = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[i], torch.nn.functional.normalize(h, dim=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vectors[-1], vectors[0])


def test_ordered_rows_keep_order():
    from esft.curation import ordered_rows

    assert ordered_rows([3, 4, 2, 5, 1, 1], capacity=7) == [[0, 1], [2, 3], [4, 5]]
    assert ordered_rows([7, 1], capacity=7) == [[0], [1]]
