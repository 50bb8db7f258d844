"""Packed documents stay apart through the production forward (`esft.models.forward`): the loss of
`token_loss` on a packed batch equals the loss of the same documents one at a time, and a
document's per-token log-probs from `target_logprobs` do not change with its neighbours.

transformers builds the block-diagonal mask from the restarting `position_ids` only when the
forward has no cache, so these tests fail if `forward_kwargs` stops passing ``use_cache=False``.
"""

import pytest
import torch

from esft.data.packing import collate_packed, collate_padded
from esft.data.tasks import get_task
from esft.data.tokenize import tokenize_records
from esft.models import build_model
from esft.models.forward import forward_kwargs, target_logprobs, token_loss

from conftest import TINY


def examples(tokenizer, n: int = 5) -> list[dict]:
    records = get_task("reverse_words").generate(n // 2) + get_task("arithmetic").generate(n - n // 2)
    return tokenize_records(records, tokenizer, max_length=256, train_on="all")[0]


def model(tokenizer, family: str = "llama", attn: str = "sdpa"):
    torch.manual_seed(0)
    return build_model(tokenizer, None, dict(TINY[family]), "float32", attn).eval()


def test_forward_kwargs_turn_the_cache_off(tokenizer):
    m = model(tokenizer)
    batch = collate_packed([examples(tokenizer, 2)])
    kwargs = forward_kwargs(m, batch)
    assert kwargs["use_cache"] is False
    assert kwargs["position_ids"] is batch["position_ids"] and "attention_mask" not in kwargs


@pytest.mark.parametrize("family,attn,chunk_size", [
    ("llama", "sdpa", 16), ("llama", "sdpa", 0), ("llama", "eager", 16), ("qwen2_moe", "sdpa", 16),
])  # chunk_size 0: the loss from the model's full logits
def test_token_loss_packed_equals_unpacked(tokenizer, family, attn, chunk_size):
    m = model(tokenizer, family, attn)
    docs = examples(tokenizer)
    with torch.no_grad():
        singles = [token_loss(m, collate_packed([[d]]), chunk_size) for d in docs]
        total = sum(s for s, _ in singles)
        count = sum(int(c) for _, c in singles)
        for batch in (collate_packed([docs[:2], docs[2:]], "flat"), collate_packed([docs[:2], docs[2:]], "rows"),
                      collate_padded([docs], tokenizer.pad_token_id)):
            loss, n = token_loss(m, batch, chunk_size)
            assert int(n) == count
            torch.testing.assert_close(loss / n, total / count, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_target_logprobs_of_a_document_ignore_its_neighbours(tokenizer, layout):
    m = model(tokenizer)
    a, b, c = examples(tokenizer, 3)
    with torch.no_grad():
        alone, _, targets = target_logprobs(m, collate_packed([[b]]))
        rows = [[a, b, c]] if layout == "flat" else [[a], [c, b]]
        packed, _, packed_targets = target_logprobs(m, collate_packed(rows, layout), chunk_size=7)
    row, start = (0, a["length"]) if layout == "flat" else (1, c["length"])
    span = slice(start, start + b["length"])
    assert torch.equal(packed_targets[row, span], targets[0])
    assert (targets[0] != -100).sum() > 10
    torch.testing.assert_close(packed[row, span], alone[0], atol=1e-5, rtol=0)


def test_cpu_varlen_equals_sdpa_documents_alone(tokenizer, family="llama"):
    """``esft_varlen`` on CPU (causal SDPA per document of a flat row): the loss and the gradients
    of a flat packed batch equal those of the same documents one at a time under ``sdpa``
    (llama's 4 query / 2 key-value heads: the grouped-query path)."""
    docs = examples(tokenizer)
    grads = []
    for attn, batches in (("sdpa", [collate_packed([[d]]) for d in docs]), ("esft_varlen", [collate_packed([docs])])):
        m = model(tokenizer, family, attn)
        total = sum(token_loss(m, b, 16)[0] for b in batches)
        total.backward()
        grads.append((total.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-6)
    for varlen, sdpa in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(varlen, sdpa, atol=1e-5, rtol=1e-4)
