import random

import pytest
import torch

from esft.data.packing import ResumableBatchSampler, best_fit_decreasing, collate_packed, collate_padded
from esft.data.tasks import get_task
from esft.data.tokenize import tokenize_records
from esft.losses import chunked_cross_entropy, cross_entropy_sum, next_token_targets
from esft.models import build_model

from conftest import TINY


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 11 // 9 + 1  # BFD's worst case is 11/9 OPT + 6/9
    assert best_fit_decreasing([5, 3, 3, 2, 2, 1], 8) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([9], 8)


def ex(*ids):
    return {"input_ids": list(ids), "labels": [-100, *ids[1:]], "length": len(ids)}


def test_collate_packed_restarts_positions_and_marks_boundaries():
    rows = [[ex(1, 2, 3), ex(4, 5)], [ex(6, 7)]]
    flat = collate_packed(rows, "flat")
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["cu_seqlens"].tolist() == [0, 3, 5, 7] and flat["max_seqlen"] == 3
    assert flat["num_tokens"] == 7 and flat["num_padding"] == 0
    by_row = collate_packed(rows, "rows")
    assert by_row["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert by_row["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert by_row["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    assert by_row["cu_seqlens"].tolist() == [0, 3, 5, 7, 10] and by_row["num_padding"] == 3
    fixed = collate_packed(rows, "flat", pad_to=8)
    assert fixed["input_ids"].shape == (1, 8) and fixed["num_padding"] == 1


def test_next_token_targets_never_cross_documents():
    batch = collate_packed([[ex(1, 2, 3), ex(4, 5)]])
    batch["labels"] = batch["input_ids"].clone()
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    assert targets.tolist() == [[2, 3, -100, 5, -100]]


def test_chunked_cross_entropy_matches_full_logits_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 50))
    targets[0, :10] = -100
    loss, count = chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    ref = cross_entropy_sum((hidden @ weight.T).reshape(-1, 40), targets.reshape(-1))
    assert int(count) == 140
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def _examples(tokenizer, n=6):
    records = get_task("reverse_words").generate(n // 2) + get_task("arithmetic").generate(n - n // 2)
    return tokenize_records(records, tokenizer, max_length=256, train_on="all")[0]


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch.get("attention_mask"), use_cache=False)
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    keep = targets != -100
    return cross_entropy_sum(out.logits[keep], targets[keep]) / keep.sum(), out.logits


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tokenizer, family, attn):
    torch.manual_seed(0)
    model = build_model(tokenizer, model_config=TINY[family], attn_implementation=attn).eval()
    examples = _examples(tokenizer)
    rows = [examples[:2], examples[2:5], examples[5:]]
    flat, _ = _loss(model, collate_packed(rows, "flat"))
    by_row, _ = _loss(model, collate_packed(rows, "rows"))
    padded, _ = _loss(model, collate_padded([examples], tokenizer.pad_token_id))
    singles = [_loss(model, collate_packed([[e]]))[0] * sum(x != -100 for x in e["labels"][1:]) for e in examples]
    unpacked_mean = sum(singles) / sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)
    for packed in (flat, by_row):
        torch.testing.assert_close(packed, unpacked_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_document_logits_do_not_change_with_neighbours(tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer, model_config=TINY["llama"], attn_implementation="sdpa").eval()
    a, b, c = _examples(tokenizer, 3)
    _, alone = _loss(model, collate_packed([[b]]))
    _, packed = _loss(model, collate_packed([[a, b, c]]))
    start = a["length"]
    torch.testing.assert_close(packed[0, start : start + b["length"]], alone[0], atol=1e-5, rtol=0)
    _, by_row = _loss(model, collate_packed([[a], [c, b]], "rows"))
    start = c["length"]
    torch.testing.assert_close(by_row[1, start : start + b["length"]], alone[0], atol=1e-5, rtol=0)


def test_resumable_batch_sampler_shuffles_per_epoch_and_skips_on_resume():
    sampler = ResumableBatchSampler(10, units_per_batch=3, seed=3)
    epoch0 = list(sampler)
    assert len(sampler) == len(epoch0) == 4 and [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    resumed = ResumableBatchSampler(10, units_per_batch=3, seed=3)
    resumed.set_epoch(1)
    resumed.resume(epoch=1, batches_done=2)
    assert list(resumed) == epoch1[2:]
    assert list(resumed) == epoch1  # the skip applies once
    ranks = [list(ResumableBatchSampler(10, 2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
