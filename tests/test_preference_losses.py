"""Preference losses against hand-computed values and the papers' limits."""

import math

import pytest
import torch

from esft.losses.preference import dpo_loss, ipo_loss, kto_loss, log_odds, orpo_loss, simpo_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_hand_values_and_rewards():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; beta * h = 0.5 * 2 = 1
    loss, rc, rr = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    # conservative DPO: the label flipped with probability 0.1
    smooth, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)))


def test_dpo_gradient_is_the_papers():
    """d loss / d logp_chosen = -beta * sigmoid(-beta * h) (DPO eq. 7), and the opposite for rejected."""
    c, r = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    loss, _, _ = dpo_loss(c, r, t(-2.0), t(-2.5), beta=0.3)
    loss.sum().backward()
    h = (-1.0 + 2.0) - (-3.0 + 2.5)
    assert c.grad.item() == pytest.approx(-0.3 / (1 + math.exp(0.3 * h)))
    assert r.grad.item() == pytest.approx(0.3 / (1 + math.exp(0.3 * h)))


def test_dpo_limits():
    c, r, rc, rr = t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.5)
    h = (c - rc) - (r - rr)
    # beta -> 0: loss -> log 2 - beta * h / 2 (first order), the same for every pair at beta = 0
    beta = 1e-4
    loss, _, _ = dpo_loss(c, r, rc, rr, beta=beta)
    torch.testing.assert_close(loss, math.log(2) - beta * h / 2, atol=1e-7, rtol=0)  # 2nd order: (beta h)^2 / 8
    # policy == reference: log 2 whatever beta
    loss, _, _ = dpo_loss(c, r, c, r, beta=7.0)
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
    # a large beta: hinge-like, 0 for a right margin, beta * |h| for a wrong one
    loss, _, _ = dpo_loss(c, r, rc, rr, beta=100.0)
    assert loss[0].item() < 1e-30 and loss[1].item() == pytest.approx(100.0 * -h[1].item(), rel=1e-6)


def test_ipo_minimum_at_margin_one_over_two_tau():
    # h = 2: zero at tau = 0.25, (2 - 1)^2 at tau = 0.5
    assert ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25)[0].item() == pytest.approx(0.0)
    assert ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)[0].item() == pytest.approx(1.0)
    # unlike DPO it does not saturate: a margin past the target is pulled back
    c = t(5.0).requires_grad_()
    ipo_loss(c, t(-3.0), t(-2.0), t(-2.0), beta=0.5)[0].sum().backward()
    assert c.grad.item() > 0


def test_simpo_hand_value_margin_and_no_reference():
    loss, rc, rr = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert (rc.item(), rr.item()) == pytest.approx((-1.0, -3.0))
    # the margin: at a reward gap of exactly gamma the loss is log 2; without it, gamma = 0
    assert simpo_loss(t(-1.0), t(-1.25), beta=2.0, gamma=0.5)[0].item() == pytest.approx(math.log(2))
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.0)[0].item() == pytest.approx(math.log(2))
    # length normalisation is the caller's (mean log-probs in): scaling both by a length changes it
    assert simpo_loss(t(-0.5 * 3), t(-1.5 * 3), beta=2.0, gamma=0.5)[0].item() != pytest.approx(loss.item())


def test_orpo_hand_value_and_log_odds():
    # p_c = 0.5 -> odds 1; p_r = 0.2 -> odds 1/4: -log sigmoid(log 4) = log(1.25)
    loss, rc, rr = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * math.log(1.25))
    assert rc.item() == pytest.approx(0.1 * math.log(0.5))
    assert log_odds(t(math.log(0.8))).item() == pytest.approx(math.log(4))
    assert torch.isfinite(log_odds(t(0.0))).all()  # p = 1 does not divide by zero
    # equal odds: beta * log 2
    assert orpo_loss(t(-1.0), t(-1.0), beta=0.2)[0].item() == pytest.approx(0.2 * math.log(2))


def test_kto_hand_values_and_reference_point():
    logps, ref, desirable = t(-1.0, -1.0), t(-2.0, -2.0), torch.tensor([True, False])
    loss, reward = kto_loss(logps, ref, desirable, t(0.5), beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss[0].item() == pytest.approx(1 - sig(0.5))
    assert loss[1].item() == pytest.approx(2.0 * (1 - sig(-0.5)))
    assert reward.tolist() == pytest.approx([1.0, 1.0])
    # z0 is clamped at 0 and carries no gradient
    kl, logps = t(-3.0).requires_grad_(), logps.requires_grad_()
    loss, _ = kto_loss(logps, ref, desirable, kl, beta=1.0)
    assert loss[0].item() == pytest.approx(1 - sig(1.0))
    loss.sum().backward()
    assert kl.grad is None and logps.grad[0].item() < 0 < logps.grad[1].item()


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss])
def test_bad_beta_is_refused(fn):
    with pytest.raises(ValueError, match="beta must be > 0"):
        fn(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.0)
