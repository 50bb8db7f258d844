"""GRPO losses, advantages and the shared token log-prob helper against hand-computed values."""

import math

import pytest
import torch

from esft.losses import group_advantages, grpo_loss, kl_k3, token_logprobs
from esft.losses.ce import chunked_cross_entropy


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    s = math.sqrt(0.5)  # unbiased std of (1, 0) and of (0, 0) is 0
    a = group_advantages(r, 2, "group", eps=0.0 + 1e-4)
    assert torch.allclose(a[:2], torch.tensor([0.5, -0.5]) / (s + 1e-4))
    assert torch.equal(a[2:], torch.zeros(4))  # identical rewards in a group: no signal
    assert torch.allclose(group_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0, 0, 0, 0]))
    batch_std = float(r.std())
    assert torch.allclose(group_advantages(r, 2, "batch"), torch.tensor([0.5, -0.5, 0, 0, 0, 0]) / (batch_std + 1e-4))
    g3 = group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, "none")
    assert torch.allclose(g3, torch.tensor([2.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(r, 4)


def test_kl_k3_hand_value():
    logp = torch.tensor([0.0, math.log(0.3)])
    ref = torch.tensor([math.log(0.5), math.log(0.3)])
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([0.5 - math.log(0.5) - 1, 0.0]))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregations_hand_values():
    # ratio 1 (logp == old), advantages (1, -1), sequence lengths 1 and 3 in a width of 4
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss = {t: grpo_loss(logp, logp, adv, mask, loss_type=t)[0].item() for t in ("grpo", "dr_grpo", "dapo", "bnpo")}
    assert loss["grpo"] == pytest.approx(0.0)  # (-1 + 1) / 2
    assert loss["dapo"] == loss["bnpo"] == pytest.approx(0.5)  # (-1 + 3) / 4 tokens
    assert loss["dr_grpo"] == pytest.approx(0.25)  # (-1 + 3) / (2 sequences * 4)
    dr = grpo_loss(logp, logp, adv, mask, loss_type="dr_grpo", max_completion_length=10)[0]
    assert dr.item() == pytest.approx(2 / 20)
    # normalisers of a larger batch this one is part of: 5 sequences, 8 completion tokens
    part = {t: grpo_loss(logp, logp, adv, mask, loss_type=t, num_sequences=5, num_tokens=8)[0].item()
            for t in ("grpo", "dr_grpo", "dapo")}
    assert part["dapo"] == pytest.approx(2 / 8) and part["dr_grpo"] == pytest.approx(2 / 20)
    assert grpo_loss(logp, logp, torch.tensor([1.0, 1.0]), mask, num_sequences=5)[0].item() == pytest.approx(-2 / 5)


def test_ratio_one_beta_zero_is_reinforce_with_normalised_advantages():
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    mask = (torch.rand(8, 6) > 0.3).float()
    mask[:, 0] = 1
    base = torch.randn(8, 6)
    for loss_type, norm in (("grpo", None), ("dapo", None), ("dr_grpo", 6)):
        logp = base.clone().requires_grad_(True)
        loss, stats = grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type)
        (grad,) = torch.autograd.grad(loss, logp)
        ref = base.clone().requires_grad_(True)
        per_seq = (ref * mask).sum(1)
        if loss_type == "grpo":
            reinforce = -(adv * per_seq / mask.sum(1)).mean()
        elif loss_type == "dapo":
            reinforce = -(adv * per_seq).sum() / mask.sum()
        else:
            reinforce = -(adv * per_seq).sum() / (8 * norm)
        (expected,) = torch.autograd.grad(reinforce, ref)
        assert torch.allclose(grad, expected, atol=1e-6), loss_type
        assert stats["clip_fraction"] == 0 and stats["ratio"] == pytest.approx(1.0)
    # by hand for one token: d loss / d logp = -A / (|o| * B)
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))


def test_clipping_and_clip_higher():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    mask = torch.ones(1, 3)
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0]), mask, eps=0.2, loss_type="dapo")
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped, no gradient; tokens 1, 2: unclipped
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.tensor([[0.0, -0.5 / 3, -1.1 / 3]]))
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    loss_high, stats_high = grpo_loss(logp, old, torch.tensor([1.0]), mask, eps=0.2, eps_high=0.6, loss_type="dapo")
    assert loss_high.item() == pytest.approx(-(1.5 + 0.5 + 1.1) / 3) and stats_high["clip_fraction"] == 0
    # negative advantage: ratio 0.5 < 0.8 is clipped from below
    loss_neg, stats_neg = grpo_loss(logp, old, torch.tensor([-1.0]), mask, eps=0.2, loss_type="dapo")
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)
    assert stats_neg["clip_fraction"].item() == pytest.approx(1 / 3)


def test_kl_term_added_with_beta():
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(0.5))
    mask = torch.ones(1, 2)
    base, _ = grpo_loss(logp, logp, torch.tensor([0.0]), mask, ref_logp=ref, beta=0.0)
    loss, stats = grpo_loss(logp, logp, torch.tensor([0.0]), mask, ref_logp=ref, beta=0.04)
    k3 = 0.5 - math.log(0.5) - 1
    assert base.item() == pytest.approx(0.0) and loss.item() == pytest.approx(0.04 * k3)
    assert stats["kl"].item() == pytest.approx(k3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.tensor([0.0]), mask, beta=0.1)


@pytest.mark.parametrize("chunk", [0, 3, 100])
def test_token_logprobs_matches_log_softmax_and_ce(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    targets[1, 4] = -100
    logp, entropy = token_logprobs(hidden, weight, targets, chunk_size=chunk, temperature=0.7)
    logits = (hidden @ weight.T) / 0.7
    full = torch.log_softmax(logits, -1)
    keep = targets != -100
    expected = torch.where(keep, full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), torch.zeros(()))
    assert torch.allclose(logp, expected, atol=1e-5)
    ent = -(full.exp() * full).sum(-1)
    assert torch.allclose(entropy[keep], ent[keep], atol=1e-5) and (entropy[~keep] == 0).all()
    g1 = torch.autograd.grad(logp.sum(), (hidden, weight))
    g2 = torch.autograd.grad(expected.sum(), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    # at temperature 1 the summed log-probs are minus the chunked cross-entropy
    lp1, _ = token_logprobs(hidden, weight, targets, chunk_size=chunk)
    ce, count = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    assert torch.allclose(-lp1.sum(), ce, atol=1e-4) and count == keep.sum()


def test_token_logprobs_no_targets_and_logits_input():
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    logp, entropy = token_logprobs(hidden, torch.randn(5, 4), torch.full((1, 3), -100))
    assert logp.shape == (1, 3) and (logp == 0).all()
    logits = torch.randn(1, 3, 5)
    t = torch.tensor([[1, 2, -100]])
    lp, _ = token_logprobs(logits, None, t)
    assert torch.allclose(lp[0, :2], torch.log_softmax(logits, -1)[0, [0, 1], [1, 2]])


def test_length_bias_of_grpo_and_not_of_dr_grpo():
    # two wrong completions (A = -1) of lengths 2 and 4: GRPO's 1/|o| penalises each token of the
    # longer one half as much (the length bias of Dr. GRPO, arXiv 2503.20783); dr_grpo does not
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([-1.0, -1.0])
    for loss_type, ratio in (("grpo", 0.5), ("dr_grpo", 1.0), ("dapo", 1.0)):
        logp = torch.zeros(2, 4, requires_grad=True)
        loss, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type)
        (g,) = torch.autograd.grad(loss, logp)
        assert g[1, 0] / g[0, 0] == pytest.approx(ratio), loss_type
