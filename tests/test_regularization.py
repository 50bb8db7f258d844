"""Dropout override, NEFTune (training only, per-document scale) and label smoothing."""

import math

import pytest
import torch
from torch import nn

from esft.losses import chunked_cross_entropy, cross_entropy_sum
from esft.models import build_model
from esft.models.forward import token_loss
from esft.objectives import SFTModule
from esft.regularization import add_neftune, document_lengths, neftune_noise, set_dropout

from conftest import TINY


def tiny(tokenizer, **overrides):
    torch.manual_seed(0)
    return build_model(tokenizer, None, {**TINY["llama"], **overrides}, "float32", "sdpa")


def packed_batch():
    """One row holding documents of 3, 5 and 4 tokens (position_ids restart at 0)."""
    torch.manual_seed(1)
    ids = torch.randint(5, 200, (1, 12))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]])
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


# ---- NEFTune ---------------------------------------------------------------------------------
def test_document_lengths():
    assert document_lengths(packed_batch()["position_ids"]).tolist() == [[3] * 3 + [5] * 5 + [4] * 4]
    two_rows = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert document_lengths(two_rows).tolist() == [[2, 2, 3, 3, 3], [5] * 5]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert document_lengths(torch.zeros(2, 4, dtype=torch.long), mask).tolist() == [[3] * 4, [4] * 4]


def test_neftune_noise_scale_is_alpha_over_sqrt_doc_length_times_dim():
    embeds = torch.zeros(1, 9, 4096)
    lengths = torch.tensor([[1] * 1 + [8] * 8])
    noise = neftune_noise(embeds, lengths, alpha=5.0, generator=torch.Generator().manual_seed(0))
    for t, L in ((0, 1), (4, 8)):
        bound = 5.0 / math.sqrt(L * 4096)
        assert noise[0, t].abs().max() <= bound
        assert noise[0, t].abs().max() > 0.99 * bound  # U(-1, 1) fills its range over 4096 draws
        assert noise[0, t].std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def capture_inputs_embeds(model):
    """Hook after NEFTune's that records the embeddings the decoder layers receive."""
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return seen, handle


def test_neftune_only_in_training(tokenizer):
    model = tiny(tokenizer)
    batch = packed_batch()
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    alpha, d = 5.0, model.config.hidden_size
    add_neftune(model, alpha)
    with torch.no_grad():  # eval: the logits do not change at all
        assert torch.equal(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, clean)
    seen, handle = capture_inputs_embeds(model)
    model.train()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    handle.remove()
    noise = seen[0] - model.get_input_embeddings()(batch["input_ids"])
    lengths = document_lengths(batch["position_ids"])[0]
    for t in range(12):
        bound = alpha / math.sqrt(lengths[t].item() * d)
        assert 0 < noise[0, t].abs().max() <= bound + 1e-7
    # the 3-token document gets more noise than the 5-token one: sqrt(5/3) times the bound
    assert noise[0, :3].abs().max() > alpha / math.sqrt(5 * d)


def test_neftune_through_the_training_loss(tokenizer):
    module = SFTModule(model_config=TINY["llama"], optim={"neftune_alpha": 50.0}, loss_chunk_size=4)
    batch = packed_batch()
    module.eval()
    plain = token_loss(module.model, batch, 4)[0]
    assert torch.equal(module.token_loss(batch)[0], plain)
    module.train()
    assert not torch.equal(module.token_loss(batch)[0], plain)


# ---- dropout ---------------------------------------------------------------------------------
def test_dropout_override_reaches_config_and_modules(tokenizer):
    model = tiny(tokenizer)
    assert model.config.attention_dropout == 0.0
    changed = set_dropout(model, 0.3)
    assert "config.attention_dropout" in changed and "model.layers.1.self_attn.attention_dropout" in changed
    assert model.model.layers[0].self_attn.attention_dropout == 0.3
    batch = packed_batch()
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    model.train()
    torch.manual_seed(0)
    a = model(**kwargs).logits
    b = model(**kwargs).logits
    assert not torch.equal(a, b)  # dropout active in training
    model.eval()
    assert torch.equal(model(**kwargs).logits, model(**kwargs).logits)


def test_dropout_sets_nn_dropout_and_refuses_models_without_dropout():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    assert set_dropout(seq, 0.2) == ["1.p"] and seq[1].p == 0.2
    with pytest.raises(ValueError, match="Linear has no dropout"):
        set_dropout(nn.Linear(2, 2), 0.1)


# ---- label smoothing -------------------------------------------------------------------------
def test_label_smoothing_hand_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([0, 2])
    eps = 0.1
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        logz = math.log(sum(math.exp(x) for x in row))
        nll = [logz - x for x in row]
        total += (1 - eps) * nll[t] + eps * sum(nll) / 3
    assert cross_entropy_sum(logits, targets, eps).item() == pytest.approx(total, rel=1e-6)
    # 0 is exactly the plain loss
    assert torch.equal(cross_entropy_sum(logits, targets, 0.0), cross_entropy_sum(logits, targets))


def test_chunked_label_smoothing_matches_full_and_default_is_unchanged():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 7))
    targets[0, :2] = -100
    full = cross_entropy_sum((hidden @ weight.T)[targets != -100], targets[targets != -100], 0.2)
    chunked, n = chunked_cross_entropy(hidden, weight, targets, chunk_size=3, label_smoothing=0.2)
    assert n == 12
    torch.testing.assert_close(chunked, full)
    assert torch.equal(chunked_cross_entropy(hidden, weight, targets, chunk_size=3)[0],
                       chunked_cross_entropy(hidden, weight, targets, chunk_size=3, label_smoothing=0.0)[0])


def test_label_smoothing_in_training_only():
    module = SFTModule(model_config=TINY["llama"], optim={"label_smoothing": 0.1}, loss_chunk_size=4)
    batch = packed_batch()
    plain = token_loss(module.model, batch, 4)[0]
    module.eval()
    assert torch.equal(module.token_loss(batch)[0], plain)  # validation loss stays plain
    module.train()
    smoothed = module.token_loss(batch)[0]
    assert not torch.equal(smoothed, plain)
    assert torch.allclose(smoothed, token_loss(module.model, batch, 4, label_smoothing=0.1)[0])
