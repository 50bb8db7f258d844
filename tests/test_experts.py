"""Expert-specialized fine-tuning: scores, selection, trainable slices, bit-identity of everything
frozen, adapters, and score -> select -> fit -> adapter -> eval on every supported MoE family."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from esft.cli import main as cli_main
from esft.experts import ExpertConfig, apply_expert_config, load_adapter, merge_experts, merged_state_dict, save_adapter
from esft.experts.adapter import adapter_config, to_reference
from esft.commands.experts import main as experts_main
from esft.experts.scoring import load_scores, score_experts
from esft.experts.selection import random_like, select_experts, select_layer
from esft.models import build_model
from esft.models.moe import FAMILIES, moe_adapter
from esft.optim import OptimConfig, build_adamw

from conftest import TINY

MOE = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]


def tiny(tokenizer, family, seed=0):
    torch.manual_seed(seed)
    return build_model(tokenizer, model_config=TINY[family], attn_implementation="sdpa")


def test_every_family_in_the_tiny_configs_and_unsupported_models_named():
    assert set(FAMILIES) == set(MOE) <= set(TINY)


def test_unsupported_model_error_names_the_families(tokenizer):
    with pytest.raises(ValueError, match="supported MoE families: deepseek_v2, deepseek_v3, qwen2_moe"):
        moe_adapter(tiny(tokenizer, "llama"))


# ---- selection -------------------------------------------------------------------------------
def test_select_layer_smallest_set_reaching_p():
    scores = [0.1, 0.5, 0.15, 0.25]
    assert select_layer(scores, 0.5) == [1]            # 0.5 reaches 0.5 by itself
    assert select_layer(scores, 0.6) == [1, 3]         # 0.5 + 0.25
    assert select_layer(scores, 0.8) == [1, 2, 3]      # 0.5 + 0.25 + 0.15 = 0.9
    assert select_layer(scores, 2.0) == [0, 1, 2, 3]   # never reached: all
    assert select_layer([0.2, 0.2, 0.1], 0.3) == [0, 1]  # tie goes to the lower id
    assert select_layer([0.5, 1.0, 0.5], 0.5, relative=True) == [1]  # 1.0 >= 0.5 * 2.0
    assert select_layer([0.5, 1.0, 0.5], 0.6, relative=True) == [0, 1]  # 1.0 < 1.2 <= 1.5
    with pytest.raises(ValueError, match="p must be"):
        select_layer(scores, 1.5, relative=True)


def test_select_experts_and_random_control_keep_counts():
    scores = {"token": {1: [0.1, 0.6, 0.3, 0.0], 3: [0.25, 0.25, 0.25, 0.25]}, "gate": {1: [0, 0, 0, 0.3], 3: [0.3, 0, 0, 0]}}
    cfg = select_experts(scores, "token", 0.5)
    assert cfg.to_dict() == {"experts": {"1": [1], "3": [0, 1]}, "shared_experts": False, "non_expert_modules": False}
    assert select_experts(scores, "gate", 0.1, shared_experts=True).to_dict()["experts"] == {"1": [3], "3": [0]}
    rand = random_like(cfg, 4, seed=1)
    assert {i: len(v) for i, v in rand.experts.items()} == {1: 1, 3: 2}
    assert [random_like(cfg, 4, seed=s).experts for s in range(20)].count(cfg.experts) < 20
    draws = [random_like(cfg, 4, seed=s, exclude=True).experts for s in range(20)]
    assert all(d[1] != [1] and len(d[1]) == 1 for d in draws) and {d[1][0] for d in draws} == {0, 2, 3}
    assert all(d[3] == [2, 3] for d in draws)  # the only 2 experts outside {0, 1}
    with pytest.raises(ValueError, match="layer 3: cannot draw 3 random experts outside the 3 selected of 4"):
        random_like(select_experts(scores, "token", 0.7), 4, exclude=True)


def test_select_cli_draws_random_experts_outside_the_selection(tmp_path):
    from esft.commands.experts import main

    scores = {"num_experts": 4, "token": {"1": [0.1, 0.6, 0.3, 0.0]}, "gate": {"1": [0, 0, 0, 0.3]}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    base = ["select", "--scores", str(tmp_path / "scores.json"), "--p", "0.5"]
    for seed in range(6):
        main(base + ["--random-seed", str(seed), "--exclude-selected", "--out", str(tmp_path / f"r{seed}.json")])
        assert ExpertConfig.load(tmp_path / f"r{seed}.json").experts[1] in ([0], [2], [3])
    with pytest.raises(SystemExit):
        main(base + ["--exclude-selected", "--out", str(tmp_path / "x.json")])


def test_concentration_and_score_distance_hand_values():
    from esft.experts.scoring import concentration, score_distance

    a = {"token": {1: [0.25, 0.25, 0.25, 0.25], 2: [1.0, 0.0, 0.0, 0.0], 3: [0.5, 0.5, 0.0, 0.0]}}
    c = concentration(a)
    assert c[1] == pytest.approx({"effective_experts": 4.0, "top_share": 0.25})
    assert c[2] == pytest.approx({"effective_experts": 1.0, "top_share": 1.0})
    assert c[3]["effective_experts"] == pytest.approx(2.0)
    b = {"token": {1: [0.25, 0.25, 0.25, 0.25], 2: [0.0, 1.0, 0.0, 0.0], 3: [0.0, 0.5, 0.5, 0.0], 4: [1.0, 0, 0, 0]}}
    # layer 1 alike (0), layer 2 disjoint (1), layer 3 half shared (0.5); layer 4 only in b
    assert score_distance(a, b) == pytest.approx(0.5)
    assert score_distance(a, a) == 0.0


def test_expert_config_format_and_errors(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"experts": {"2": [5, 1]}, "shared_experts": True, "non_expert_modules": False}))
    cfg = ExpertConfig.load(path)
    assert cfg.experts == {2: [1, 5]} and cfg.shared_experts and not cfg.non_expert_modules
    cfg.save(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["experts"] == {"2": [1, 5]}
    for bad, msg in [({"experts": {"x": [1]}}, "not an integer"), ({"experts": {"1": [1, 1]}}, "twice"),
                     ({"experts": {"1": [1]}, "typo": 1}, "unknown keys"), ({"layers": {}}, "'experts' mapping")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            ExpertConfig.load(path)


def test_config_naming_a_dense_layer_or_missing_expert_is_an_error(tokenizer):
    model = tiny(tokenizer, "deepseek_v3")  # layer 0 is dense
    with pytest.raises(ValueError, match=r"layer 0, which is not a sparse MoE layer .*sparse layers: \[1\]"):
        apply_expert_config(model, ExpertConfig({0: [1]}))
    with pytest.raises(ValueError, match="out of range"):
        apply_expert_config(model, ExpertConfig({1: [4]}))


# ---- scoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral"])
def test_scores_equal_pooled_and_per_sequence_means_computed_one_sequence_at_a_time(tokenizer, family):
    model = tiny(tokenizer, family).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (7, 12, 5)]
    pooled = score_experts(model, seqs, max_tokens=64, progress=False)  # all three in one packed batch
    per_seq = score_experts(model, seqs, max_tokens=64, progress=False, average="sequences")
    assert (pooled["average"], per_seq["average"]) == ("tokens", "sequences")
    moe = moe_adapter(model)
    E, K, n = moe.num_experts(model.config), moe.top_k(model.config), sum(map(len, seqs))
    for layer, block in moe.layers(model).items():
        want = {key: torch.zeros(E, dtype=torch.float64) for key in ("gate", "token", "gate_seq", "token_seq")}
        for seq in seqs:
            seen = {}
            h = block.gate.register_forward_hook(lambda m, a, out: seen.update(w=out[1], i=out[2]))
            with torch.no_grad():
                model(torch.tensor([seq]))
            h.remove()
            for t in range(len(seq)):
                for w, e in zip(seen["w"][t].tolist(), seen["i"][t].tolist()):
                    want["gate"][e] += w / n
                    want["token"][e] += 1 / K / n
                    want["gate_seq"][e] += w / len(seq) / len(seqs)
                    want["token_seq"][e] += 1 / K / len(seq) / len(seqs)
        for scores, tail in ((pooled, ""), (per_seq, "_seq")):
            got = {key: torch.tensor(scores[key][layer], dtype=torch.float64) for key in ("gate", "token")}
            torch.testing.assert_close(got["gate"], want["gate" + tail], atol=1e-6, rtol=0)
            torch.testing.assert_close(got["token"], want["token" + tail], atol=1e-12, rtol=0)
            assert abs(sum(scores["token"][layer]) - 1.0) < 1e-9
    assert max(abs(a - b) for a, b in zip(pooled["token"][layer], per_seq["token"][layer])) > 1e-3  # they differ


def test_reference_score_file_reads_and_selects_like_the_reference(tmp_path):
    # deepseek-ai/ESFT's summary.json: layer -> expert -> score (4 decimals); its selection adds
    # experts by descending score until the sum reaches p, and lists them in that order
    token = {"1": {"0": 0.05, "1": 0.4, "2": 0.3, "3": 0.25}, "2": {"0": 0.25, "1": 0.25, "2": 0.25, "3": 0.25}}
    gate = {"1": {"0": 0.01, "1": 0.2, "2": 0.1, "3": 0.05}, "2": {"0": 0.1, "1": 0.1, "2": 0.1, "3": 0.1}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"token_scores": token, "gate_scores": gate}))
    scores = load_scores(path)
    assert scores["token"][1] == [0.05, 0.4, 0.3, 0.25] and scores["average"] == "tokens" and scores["num_experts"] == 4
    assert select_experts(scores, "token", 0.6).experts == {1: [1, 2], 2: [0, 1, 2]}
    assert select_experts(scores, "gate", 0.25).experts == {1: [1, 2], 2: [0, 1, 2]}
    path.write_text(json.dumps({"token_scores": {"1": {"0": 0.5, "2": 0.5}}, "gate_scores": {}}))
    with pytest.raises(ValueError, match=r"token_scores\['1'\] does not list experts 0..1"):
        load_scores(path)


# ---- trainable slices ------------------------------------------------------------------------
def _batch(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, n), generator=g)
    return ids


def _train(model, steps, fused, weight_decay=0.1):
    opt = build_adamw(model, OptimConfig(lr=1e-2, weight_decay=weight_decay, fused=fused))
    for step in range(steps):
        ids = _batch(step)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_frozen_weights_and_slices_stay_bit_identical(tokenizer, family, fused):
    model = tiny(tokenizer, family)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(moe_adapter(model).layers(model))
    cfg = ExpertConfig({layers[0]: [1, 3]} | ({layers[1]: [2]} if len(layers) > 1 else {}))
    n = apply_expert_config(model, cfg)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.rsplit(".", 1)[-1] in ("esft_gate_up_proj", "esft_down_proj") for name in trainable)
    assert n == sum(p.numel() for p in trainable.values())
    opt = _train(model, 3, fused)
    # optimizer state exists only for the [k, ...] slices
    assert {tuple(s["exp_avg"].shape) for s in opt.state.values()} == {tuple(p.shape) for p in trainable.values()}
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), key  # fused expert tensors included: slices live apart
    changed = False
    for layer, ids in cfg.experts.items():
        experts = model.get_decoder().layers[layer].mlp.experts
        frozen = [e for e in range(experts.num_experts) if e not in ids]
        assert torch.equal(experts.gate_up_proj[frozen], base[f"model.layers.{layer}.mlp.experts.gate_up_proj"][frozen])
        changed |= not torch.equal(experts.esft_gate_up_proj, base[f"model.layers.{layer}.mlp.experts.gate_up_proj"][ids])
    assert changed
    merged = merged_state_dict(model)
    assert set(merged) == set(base)
    layer, ids = next(iter(cfg.experts.items()))
    key = f"model.layers.{layer}.mlp.experts.down_proj"
    experts = model.get_decoder().layers[layer].mlp.experts
    assert torch.equal(merged[key][ids], experts.esft_down_proj.detach())
    frozen = [e for e in range(experts.num_experts) if e not in ids]
    assert torch.equal(merged[key][frozen], base[key][frozen])


@pytest.mark.parametrize("family", MOE)
def test_grouped_slices_get_exactly_the_fft_gradients_and_frozen_experts_none(tokenizer, family):
    fft = tiny(tokenizer, family)  # transformers' own grouped_mm experts, everything trainable
    assert fft.config._experts_implementation == "grouped_mm"
    model = copy.deepcopy(fft)
    layers = list(moe_adapter(fft).layers(fft))
    cfg = ExpertConfig({layer: [[3, 1], [0, 2]][n % 2] for n, layer in enumerate(layers)})
    apply_expert_config(model, cfg)
    ids = _batch(3)
    reference, tuned = fft(ids, labels=ids, use_cache=False), model(ids, labels=ids, use_cache=False)
    assert torch.equal(tuned.logits, reference.logits)
    reference.loss.backward()
    tuned.loss.backward()
    for layer, chosen in cfg.experts.items():
        mine, full = model.get_decoder().layers[layer].mlp.experts, fft.get_decoder().layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            want = getattr(full, name).grad[chosen]  # the config sorted [3, 1]: slots hold ascending ids
            assert want.abs().amax() > 1e-4  # the rows were reached
            # fp32 summation order only (the two paths sort rows differently): about 1e-7 relative
            torch.testing.assert_close(getattr(mine, "esft_" + name).grad, want, rtol=1e-5, atol=1e-6 * want.abs().amax())
    assert all(p.grad is None for n, p in model.named_parameters() if "esft_" not in n)


def test_a_selected_expert_no_token_reached_gets_a_zero_gradient(tokenizer):
    model = tiny(tokenizer, "qwen3_moe")
    apply_expert_config(model, ExpertConfig({0: [1, 3]}))
    experts = model.get_decoder().layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, model.config.hidden_size, generator=g)
    index = torch.tensor([[0, 1], [2, 1], [1, 0], [2, 0]] * 2 + [[0, 2], [1, 2]])  # expert 3 never chosen
    weights = torch.rand(10, 2, generator=g)
    out = experts(hidden, index, weights)
    frozen = type(experts).forward(experts, hidden, index, weights)  # transformers' grouped_mm path
    torch.testing.assert_close(out, frozen, rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    grad = experts.esft_gate_up_proj.grad
    assert grad[0].abs().amax() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_shared_and_non_expert_options_unfreeze_what_they_name(tokenizer):
    model = tiny(tokenizer, "qwen2_moe")
    apply_expert_config(model, ExpertConfig({0: [1]}, shared_experts=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".shared_expert." in n for n in names) and any("shared_expert_gate" in n for n in names)
    assert not any("self_attn" in n or "embed" in n or n.endswith("mlp.gate.weight") for n in names)
    model = tiny(tokenizer, "qwen2_moe")
    apply_expert_config(model, ExpertConfig({}, non_expert_modules=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("self_attn" in n for n in names) and any(n.endswith("mlp.gate.weight") for n in names)
    assert not any("shared_expert" in n or "experts." in n for n in names)


# ---- adapters --------------------------------------------------------------------------------
def _tuned(tokenizer, family, cfg):
    """A tiny `family` model with `cfg` applied and trained 2 steps (eval mode), a batch, its logits."""
    model = tiny(tokenizer, family)
    apply_expert_config(model, cfg)
    _train(model, 2, fused=True)
    model.eval()
    ids = _batch(9)
    with torch.no_grad():
        return model, ids, model(ids).logits


def test_adapter_reloads_exact_logits_and_merges(tokenizer, tmp_path):
    cfg = ExpertConfig({0: [0], 1: [1, 2]})
    model, ids, tuned = _tuned(tokenizer, "olmoe", cfg)
    save_adapter(model, cfg, tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    assert trained <= size < trained + 4096  # the slices and a small header, nothing else
    base = tiny(tokenizer, "olmoe").eval()
    load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(base(ids).logits, tuned)
        merge_experts(base)
        assert not any(p for p in [getattr(b.experts, "esft_down_proj", None) for b in moe_adapter(base).layers(base).values()])
        torch.testing.assert_close(base(ids).logits, tuned, atol=1e-5, rtol=0)
    fresh = tiny(tokenizer, "mixtral")
    with pytest.raises(ValueError, match="trained on a olmoe model; this model is mixtral"):
        load_adapter(fresh, tmp_path / "adapter")


def test_adapter_round_trips_through_the_reference_layout_with_identical_logits(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ExpertConfig({1: [3, 0]}, shared_experts=True)  # tiny deepseek_v2: layer 0 dense, layer 1 sparse
    model, ids, tuned = _tuned(tokenizer, "deepseek_v2", cfg)
    save_adapter(model, cfg, tmp_path / "ours")
    ours = tiny(tokenizer, "deepseek_v2")
    load_adapter(ours, tmp_path / "ours")
    save_adapter(ours, adapter_config(tmp_path / "ours"), tmp_path / "ref", layout="deepseek")
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["expert_cfg.json", "model.safetensors"]
    assert json.loads((tmp_path / "ref" / "expert_cfg.json").read_text()) == {
        "experts": {"1": [0, 3]}, "shared_experts": True, "non_expert_modules": False}
    files = load_file(tmp_path / "ref" / "model.safetensors")
    experts = model.get_decoder().layers[1].mlp.experts
    width = experts.esft_down_proj.shape[-1]
    assert {k for k in files if ".experts." in k} == {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"
                                                      for e in (0, 3) for p in ("gate", "up", "down")}
    assert torch.equal(files["model.layers.1.mlp.experts.3.up_proj.weight"], experts.esft_gate_up_proj[1, width:])
    assert any(k.startswith("model.layers.1.mlp.shared_experts.") for k in files)
    back = tiny(tokenizer, "deepseek_v2").eval()
    load_adapter(back, tmp_path / "ref")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, tuned)
    # the reference's legacy key prefix and sharded files load too
    save_file({k.removeprefix("model."): v for k, v in files.items() if ".experts." in k}, tmp_path / "ref" / "model.safetensors")
    save_file({k: v for k, v in files.items() if ".experts." not in k}, tmp_path / "ref" / "model-2.safetensors")
    again = tiny(tokenizer, "deepseek_v2").eval()
    load_adapter(again, tmp_path / "ref")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tuned)
    # per-expert keys mean what transformers makes of them: a full checkpoint in the same naming,
    # fused by transformers' own checkpoint conversion, computes the tuned logits
    merged = merged_state_dict(model)
    full = {e: merged[f"model.layers.1.mlp.experts.{p}"] for e, p in ((0, "gate_up_proj"), (1, "down_proj"))}
    per_expert = to_reference({"model.layers.1.mlp.experts.esft_gate_up_proj": full[0],
                               "model.layers.1.mlp.experts.esft_down_proj": full[1]}, ExpertConfig({1: list(range(4))}))
    checkpoint = {k: v for k, v in merged.items() if ".mlp.experts." not in k} | per_expert
    model.config.save_pretrained(tmp_path / "full")
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned, atol=1e-5, rtol=0)


def test_reference_adapter_naming_an_untrained_expert_is_an_error(tokenizer, tmp_path):
    from safetensors.torch import save_file

    model = tiny(tokenizer, "deepseek_v2")
    (tmp_path / "expert_cfg.json").write_text(json.dumps({"experts": {"1": [2]}, "shared_experts": False,
                                                          "non_expert_modules": False}))
    weights = {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight": torch.zeros(32 if p != "down" else 64, 32 if p == "down" else 64)
               for e in (1, 2) for p in ("gate", "up", "down")}
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layer 1 holds weights of experts \[1\], which its expert config does not train"):
        load_adapter(model, tmp_path)


# ---- the whole path through the CLI, every family ---------------------------------------------
def _fit_config(root: Path, family: str, experts: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(root), "limit_val_batches": 0,
                    "callbacks": [{"class_path": "esft.callbacks.ExportHF", "init_args": {"dirpath": str(root / "hf")}},
                                  {"class_path": "esft.experts.ExportExpertAdapter",
                                   "init_args": {"dirpath": str(root / "adapter")}}]},
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_name_or_path": str(root / "base"), "tokenizer": "builtin", "experts": str(experts),
                                "optim": {"lr": 1e-2, "weight_decay": 0.1}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["arithmetic"], "num_train_per_task": 16, "num_val_per_task": 0,
                               "max_length": 64, "max_tokens": 128}},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("family", MOE)
def test_score_select_fit_adapter_eval_on_every_family(tokenizer, tmp_path, family):
    from esft.evaluation.perplexity import perplexity
    from esft.data.tasks import get_task

    tiny(tokenizer, family).save_pretrained(tmp_path / "base")
    experts_main(["score", "--model", str(tmp_path / "base"), "--tokenizer", "builtin", "--tasks", "arithmetic",
                  "--num-per-task", "16", "--tokens", "300", "--max-length", "64", "--out", str(tmp_path / "scores")])
    scores = load_scores(tmp_path / "scores" / "scores.json")
    assert (tmp_path / "scores" / "heatmap.png").stat().st_size > 0 and 300 <= scores["num_tokens"] < 300 + 64
    assert scores["average"] == "tokens"  # whole sequences, the last one too, pooled
    experts_main(["select", "--scores", str(tmp_path / "scores" / "scores.json"), "--method", "token", "--p", "0.2",
                  "--out", str(tmp_path / "experts.json")])
    cfg = ExpertConfig.load(tmp_path / "experts.json")
    assert set(cfg.experts) == set(int(i) for i in scores["token"]) and cfg.num_selected() >= len(cfg.experts)
    cli = cli_main(["fit", "--config", str(_fit_config(tmp_path, family, tmp_path / "experts.json"))])
    tuned = cli.model.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa").eval()
    load_adapter(base, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    ids = _batch(5)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, tuned(ids).logits)
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-5, rtol=0)
    records = get_task("arithmetic").generate(8, seed=1)
    ppl = [perplexity(m, tokenizer, records)["perplexity"] for m in (base, merged)]
    assert abs(ppl[0] - ppl[1]) < 1e-3 * ppl[0]
    experts_main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                  "--tokenizer", "builtin", "--out", str(tmp_path / "merged")])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, merged(ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_bit_identical_on_cuda_with_fused_adamw(tokenizer, dtype):
    model = tiny(tokenizer, "deepseek_v2").to("cuda", dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_expert_config(model, ExpertConfig({1: [0, 3]}))
    opt = build_adamw(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=True))
    for step in range(3):
        ids = _batch(step).cuda()
        model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert not torch.equal(model.model.layers[1].mlp.experts.esft_down_proj, base["model.layers.1.mlp.experts.down_proj"][[0, 3]])
