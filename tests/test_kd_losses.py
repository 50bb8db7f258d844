"""Distillation losses against hand-computed values, their limits, masking and chunking."""

import math

import pytest
import torch
import torch.nn.functional as F

from esft.losses.ce import IGNORE_INDEX, next_token_targets
from esft.losses.kd import chunked_kd_loss, chunked_topk_kd_loss, kd_divergence, topk_kd_divergence

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tv"]

# teacher (0.8, 0.2), student (0.5, 0.5)
T = torch.tensor([[math.log(0.8), math.log(0.2)]])
S = torch.zeros(1, 2)


def test_hand_computed_values():
    fkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # 0.19274
    rkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # 0.22314
    m = (0.65, 0.35)  # 0.5 * T + 0.5 * S
    jsd = 0.5 * (0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))  # 0.05067
    assert kd_divergence(S, T, "forward_kl").item() == pytest.approx(fkl, rel=1e-5)
    assert kd_divergence(S, T, "reverse_kl").item() == pytest.approx(rkl, rel=1e-5)
    assert kd_divergence(S, T, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert kd_divergence(S, T, "tv").item() == pytest.approx(0.3, rel=1e-5)
    # beta weights the teacher: M = 0.9 T + 0.1 S
    m9 = (0.9 * 0.8 + 0.1 * 0.5, 0.9 * 0.2 + 0.1 * 0.5)
    jsd9 = 0.9 * (0.8 * math.log(0.8 / m9[0]) + 0.2 * math.log(0.2 / m9[1])) \
        + 0.1 * (0.5 * math.log(0.5 / m9[0]) + 0.5 * math.log(0.5 / m9[1]))
    assert kd_divergence(S, T, "jsd", beta=0.9).item() == pytest.approx(jsd9, rel=1e-5)


def test_temperature_softens_both():
    # at tau = 2 the teacher (0.8, 0.2) becomes (2/3, 1/3); the uniform student stays uniform
    expected = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)  # 0.05663
    assert kd_divergence(S, T, "forward_kl", temperature=2.0).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(S, T, temperature=0.0)


def test_beta_limits_are_the_two_kls():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    fkl, rkl = kd_divergence(s, t, "forward_kl"), kd_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=1.0), rkl)
    eps = 1e-4  # the mixture formula approaches the KLs up to the scale beta (resp. 1 - beta)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_when_student_equals_teacher(divergence):
    torch.manual_seed(1)
    x = torch.randn(4, 9)
    assert kd_divergence(x, x.clone(), divergence, temperature=1.7).abs().max().item() < 1e-6
    assert (kd_divergence(x, torch.randn(4, 9), divergence) > 0).all()


def test_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError, match="vocabularies differ"):
        kd_divergence(torch.zeros(1, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_kd_loss(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, 4), torch.zeros(6, 4), torch.zeros(2, dtype=torch.long))


def _setup(seed=0, b=2, n=7, h=6, v=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(b, n, 2 * h, generator=g), torch.randn(v, 2 * h, generator=g)
    labels = torch.randint(0, v, (b, n), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])  # row 0 holds two documents
    return hidden, weight, t_hidden, t_weight, next_token_targets(labels, positions)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_matches_direct_and_masks(divergence):
    hidden, weight, t_hidden, t_weight, targets = _setup()
    keep = targets != IGNORE_INDEX
    s_logits, t_logits = hidden[keep] @ weight.T, t_hidden[keep] @ t_weight.T
    want_kd = kd_divergence(s_logits, t_logits, divergence, 0.3, 1.5).sum()
    want_ce = F.cross_entropy(s_logits, targets[keep], reduction="sum")
    want_kd.backward()
    want_grad = hidden.grad.clone()
    hidden.grad = None
    for chunk in (0, 2, 3):
        kd, ce, n = chunked_kd_loss(hidden, weight, t_hidden, t_weight, targets, divergence=divergence,
                                    beta=0.3, temperature=1.5, chunk_size=chunk)
        assert int(n) == int(keep.sum()) == 9  # row 0: 3 (prompt, boundary masked), row 1: 6
        torch.testing.assert_close(kd, want_kd)
        torch.testing.assert_close(ce, want_ce)
        kd.backward()
        torch.testing.assert_close(hidden.grad, want_grad)
        assert hidden.grad[~keep].abs().max() == 0  # masked positions get no gradient
        hidden.grad = None


def test_masked_positions_do_not_matter():
    hidden, weight, t_hidden, t_weight, targets = _setup()
    keep = targets != IGNORE_INDEX
    a = chunked_kd_loss(hidden, weight, t_hidden, t_weight, targets, chunk_size=4)[0]
    t_hidden2 = t_hidden.clone()
    t_hidden2[~keep] = 100.0
    with torch.no_grad():
        hidden2 = hidden.clone()
        hidden2[~keep] = -100.0
    b = chunked_kd_loss(hidden2, weight, t_hidden2, t_weight, targets, chunk_size=4)[0]
    torch.testing.assert_close(a, b)


def _topk(t_logits, k, temperature):
    lp = F.log_softmax(t_logits / temperature, dim=-1)
    values, ids = lp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocabulary_is_the_online_loss(divergence, temperature):
    torch.manual_seed(2)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    ids, lp = _topk(t, 10, temperature)
    torch.testing.assert_close(topk_kd_divergence(s, ids, lp, divergence, 0.4, temperature),
                               kd_divergence(s, t, divergence, 0.4, temperature))


def test_topk_tail_bucket_hand_computed():
    # teacher (0.7, 0.2, 0.1), student (0.5, 0.25, 0.25), k = 1: buckets (0.7, 0.3) vs (0.5, 0.5)
    t = torch.tensor([[0.7, 0.2, 0.1]]).log()
    s = torch.tensor([[0.5, 0.25, 0.25]]).log()
    ids, lp = _topk(t, 1, 1.0)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    got = topk_kd_divergence(s, ids, lp, "forward_kl")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() <= kd_divergence(s, t, "forward_kl").item()  # a lower bound of the full KL


def test_chunked_topk_matches_online_with_full_vocabulary():
    hidden, weight, t_hidden, t_weight, targets = _setup(seed=3)
    keep = targets != IGNORE_INDEX
    ids, lp = _topk(t_hidden[keep] @ t_weight.T, weight.shape[0], 1.0)
    for divergence in DIVERGENCES:
        online = chunked_kd_loss(hidden, weight, t_hidden, t_weight, targets, divergence=divergence, chunk_size=4)
        cached = chunked_topk_kd_loss(hidden, weight, ids, lp, targets, divergence=divergence, chunk_size=4)
        torch.testing.assert_close(cached[0], online[0])
        torch.testing.assert_close(cached[1], online[1])
    with pytest.raises(ValueError, match="does not match this data"):
        chunked_topk_kd_loss(hidden, weight, ids[1:], lp[1:], targets)
