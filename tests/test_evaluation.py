"""Generation, pass@k, perplexity and the `esft eval` command, on a tiny model trained here."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from esft.callbacks import TaskEvaluation
from esft.cli import main as cli_main
from esft.cli import run
from esft.data.tasks import get_task
from esft.evaluation import generate, pass_at_k, perplexity
from esft.models import load_tokenizer

from test_e2e import config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cli_main(["fit", "--config", str(config(root, 30)), "--trainer.callbacks+=esft.callbacks.TaskEvaluation",
              "--trainer.callbacks.tasks=[reverse_words]", "--trainer.callbacks.every_n_steps=10"])
    return root


def test_pass_at_k_matches_the_combinatorial_definition():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_results_table_explains_each_task_still_below_low_score():
    """A task scoring under `low_score` after training gets one line under the table: its own reason
    where the task gives one (arithmetic), a general one otherwise; none at or above the bar."""
    callback = TaskEvaluation(tasks=["arithmetic", {"name": "reverse_words"}, "sort_words"], low_score=0.5)
    callback.results = {"before": {"arithmetic": 0.0, "reverse_words": 0.0, "sort_words": 0.0},
                        "after": {"arithmetic": 0.04, "reverse_words": 0.2, "sort_words": 0.5}}
    lines = callback.table().splitlines()
    assert lines[-5:-2] == ["| arithmetic | exact_match | 0.000 | 0.040 |", "| reverse_words | exact_match | 0.000 | 0.200 |",
                            "| sort_words | exact_match | 0.000 | 0.500 |"]
    assert lines[-2].startswith("arithmetic is still below 0.5: ") and "carr" in lines[-2]
    assert lines[-1].startswith("reverse_words is still below 0.5: ") and "max_steps" in lines[-1]
    callback.low_score = 0.0
    assert callback.table().splitlines()[-1] == "| sort_words | exact_match | 0.000 | 0.500 |"
    callback.results = {"before": callback.results["before"]}  # no "after" column: nothing to explain
    assert callback.table().splitlines()[-1] == "| sort_words | exact_match | 0.000 |"


def test_periodic_evaluation_is_logged(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = [e.step for e in EventAccumulator(str(trained)).Reload().Scalars("eval/reverse_words/exact_match")]
    assert {10, 20} <= set(steps)


def test_batched_greedy_generation_equals_one_by_one(trained):
    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    tokenizer = load_tokenizer(str(trained / "hf"))
    conversations = [r["messages"][:-1] for r in get_task("arithmetic").generate(12, split="heldout")]
    batched = generate(model, tokenizer, conversations, max_new_tokens=8, batch_size=12)
    single = generate(model, tokenizer, conversations, max_new_tokens=8, batch_size=1)
    assert batched == single and len(batched) == 12


def test_sampling_returns_num_samples_per_prompt(trained):
    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    tokenizer = load_tokenizer(str(trained / "hf"))
    conversations = [r["messages"][:-1] for r in get_task("reverse_words").generate(3)]
    out = generate(model, tokenizer, conversations, max_new_tokens=6, num_samples=4, temperature=1.0)
    assert len(out) == 12


def test_perplexity_counts_trained_tokens_and_drops_with_training(trained):
    records = get_task("reverse_words").generate(20, split="heldout")
    tokenizer = load_tokenizer(str(trained / "hf"))
    after = perplexity(AutoModelForCausalLM.from_pretrained(trained / "hf"), tokenizer, records, max_length=64, max_tokens=256)
    fresh = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(trained / "hf").config)
    before = perplexity(fresh, tokenizer, records, max_length=64, max_tokens=256)
    assert after["examples"] == 20 and after["tokens"] > 20
    assert after["perplexity"] < before["perplexity"] and after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item())


def test_esft_eval_on_export_and_checkpoint(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    monkeypatch.setattr("sys.argv", ["esft", "eval", "--model", str(trained / "hf"), "--tasks", "reverse_words", "arithmetic",
                                     "--num-examples", "8", "--max-new-tokens", "8", "--out", str(out)])
    run()
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"reverse_words", "arithmetic"}
    assert 0.0 <= report["results"]["reverse_words"]["pass@1"] <= 1.0
    assert "| reverse_words | 8 |" in capsys.readouterr().out and (out / "results.md").exists()
    assert list(out.glob("events.out.tfevents.*"))

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in get_task("reverse_words").generate(6, split="heldout")))
    monkeypatch.setattr("sys.argv", ["esft", "eval", "--model", str(trained / "checkpoints" / "last.ckpt"), "--data", str(data),
                                     "--num-samples", "3", "--k", "1", "3", "--max-new-tokens", "8", "--out", str(out)])
    run()
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["reverse_words"]["n"] == 6 and results["reverse_words"]["pass@3"] >= results["reverse_words"]["pass@1"]
    assert results["perplexity:d.jsonl"]["perplexity"] > 1.0


def test_esft_eval_rejects_unknown_tasks(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["esft", "eval", "--model", "x", "--tasks", "nope"])
    with pytest.raises(SystemExit):
        run()
    assert "unknown tasks ['nope']" in capsys.readouterr().err


def test_esft_eval_scores_gsm8k_and_math_style_files(trained, tmp_path, monkeypatch):
    rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
            {"problem": "What is 3 - 1?", "solution": r"It is $\boxed{2}$."}]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    monkeypatch.setattr("sys.argv", ["esft", "eval", "--model", str(trained / "hf"), "--math-data", str(data),
                                     "--max-new-tokens", "8", "--out", str(out)])
    run()
    result = json.loads((out / "results.json").read_text())["results"]["math:math.jsonl"]
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0


def test_rollout_token_ids_match_text(trained):
    from esft.evaluation.generate import rollout

    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    tok = load_tokenizer(str(trained / "hf"))
    convs = [[{"role": "user", "content": "reverse: a b"}], [{"role": "user", "content": "hello there friend"}]]
    outs = rollout(model, tok, convs, max_new_tokens=5, num_samples=2, do_sample=True, top_p=0.9)
    assert len(outs) == 4
    for r, conv in zip(outs, [convs[0]] * 2 + [convs[1]] * 2):
        prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert r.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
        assert 1 <= len(r.completion_ids) <= 5
        assert r.truncated == (tok.eos_token_id not in r.completion_ids)
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True).strip()



WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def sharp_model(tokenizer, model_type: str = "llama"):
    """A tiny random model whose greedy completions depend on the prompt: at init attention is
    near uniform and blind to positions, so its q and k projections are scaled up."""
    from esft.models import build_model

    from conftest import TINY

    torch.manual_seed(0)
    model = build_model(tokenizer, None, dict(TINY[model_type]), "float32", "sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30)
    return model


def prompts(*words: int) -> list[list[dict[str, str]]]:
    """One user turn per count: the first that many of `WORDS`."""
    return [[{"role": "user", "content": " ".join(WORDS[:n])}] for n in words]


@pytest.mark.parametrize("model_type, cache", [("llama", "static"), ("llama", "dynamic"), ("qwen2", "static")])
def test_shared_prefix_rollout_equals_generate_with_copies(tokenizer, monkeypatch, model_type, cache):
    """Prompts run once with their KV cache copied to the G samples give the same greedy
    completions, token for token, as ``generate(num_return_sequences=G)``, for prompts of
    different lengths in one left-padded batch; with one seed, the same samples too."""
    import importlib

    from esft.evaluation import rollout

    model = sharp_model(tokenizer, model_type)
    convs = prompts(1, 7, 3, 12)
    gen = importlib.import_module("esft.evaluation.generate")  # the module, not the function of that name
    prefill, calls = gen.prefill_shared, []
    monkeypatch.setattr(gen, "prefill_shared", lambda m, enc, *a: calls.append(enc["input_ids"].shape[0]) or prefill(m, enc, *a))

    def ids(share: bool, conversations=convs, num_samples=3, **sampling) -> list[list[int]]:
        torch.manual_seed(1)
        outs = rollout(model, tokenizer, conversations, 12, num_samples=num_samples, share_prefix=share, cache=cache, **sampling)
        return [r.prompt_ids + r.completion_ids for r in outs]

    # greedy ``generate`` refuses num_return_sequences > 1: the plain path gets each prompt 3 times
    plain = ids(False, [c for c in convs for _ in range(3)], num_samples=1)
    assert not calls
    assert ids(True, do_sample=False) == plain
    assert calls == [4]  # the prompts ran once, not 3 times
    assert len({tuple(x) for x in plain}) == 4  # the prompts lead to different completions
    sampled = ids(True, do_sample=True, top_k=0)
    assert sampled == ids(False, do_sample=True, top_k=0)
    assert len({tuple(x) for x in sampled}) == 12


@pytest.mark.parametrize("backend", [pytest.param("inductor", marks=pytest.mark.slow), "eager"])
def test_compiled_decode_gives_the_eager_greedy_completions(tokenizer, monkeypatch, backend):
    """``compile_decode=True`` compiles ``generate``'s decode step on CPU (``auto`` does not:
    transformers' rule), once: other prompt widths and batch sizes (dynamic shapes), and the
    plain path's own static cache after the shared prefix's (fresh tensors, not views), reuse
    the graph. The greedy completions are the eager ones, token for token, on both paths (shared:
    3 samples per prompt). Inductor, the backend rollouts use, takes one to two minutes to
    compile here (slow); the ``eager`` backend runs Dynamo's capture and guards, which decide what
    recompiles, without Inductor's code, in seconds."""
    import functools
    import importlib

    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from esft.evaluation import rollout

    gen = importlib.import_module("esft.evaluation.generate")
    monkeypatch.setattr(gen, "CompileConfig", functools.partial(CompileConfig, backend=backend))
    torch._dynamo.reset()  # a graph of an earlier test would be reused
    model = sharp_model(tokenizer)
    decided = []  # per generate call: whether transformers compiles its decode step
    criteria = model._valid_auto_compile_criteria
    monkeypatch.setattr(model, "_valid_auto_compile_criteria", lambda *a: decided.append(criteria(*a)) or decided[-1])

    def ids(compile_decode, convs, num_samples=3, share_prefix=True) -> list[list[int]]:
        decided.clear()
        outs = rollout(model, tokenizer, convs, 10, num_samples=num_samples, share_prefix=share_prefix,
                       compile_decode=compile_decode, do_sample=False)
        return [r.prompt_ids + r.completion_ids for r in outs]

    first, second = prompts(1, 7, 3, 12), prompts(2, 9)
    eager = ids("auto", first)
    assert decided == [False]
    assert len({tuple(x) for x in eager}) == 4  # the prompts lead to different completions
    graphs = counters["stats"]["unique_graphs"]
    assert ids(True, first) == eager and decided == [True]
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert ids(True, second) == ids(False, second)
    assert ids(True, first, num_samples=1, share_prefix=False) == eager[::3] and decided == [True]
    assert counters["stats"]["unique_graphs"] == graphs + 1  # no recompile


def test_compiled_decode_needs_the_static_cache(tokenizer):
    """``compile_decode=True`` with the dynamic cache, or a value other than auto/True/False, is
    an error naming it, raised before any generation."""
    from esft.evaluation import rollout

    model = sharp_model(tokenizer)
    with pytest.raises(ValueError, match="compile_decode=True .* static cache; got cache='dynamic'"):
        rollout(model, tokenizer, prompts(3), 4, num_samples=2, cache="dynamic", compile_decode=True)
    with pytest.raises(ValueError, match="compile_decode must be 'auto', True or False, got 'yes'"):
        rollout(model, tokenizer, prompts(3), 4, num_samples=2, compile_decode="yes")
