"""Built-in tasks: determinism, disjoint splits, verifiers, docstring examples and JSONL export.

Run: python -m pytest -q tests/test_tasks.py
"""

import doctest
import importlib
import json

import pytest

from esft.data.records import load_records
from esft.data.tasks import DOMAINS, TASKS, build_task, get_task, split_of
from esft.commands.export import FORMATS, export_task, main
from esft.data.tasks.math import extract_answer, math_equal, normalize_number, reference_answer, score_rows

EXACT = {"arithmetic", "reverse_words", "sort_words", "math_word", "list_ops", "intent_json", "verdict", "general", "lexicon"}


def wrong_answer(name: str, record: dict) -> str:
    """A plausible but wrong completion for `record`."""
    answer = record["answer"]
    if name == "math_word":
        n = int(answer.rsplit("####", 1)[1])
        return answer.rsplit("####", 1)[0] + f"#### {n + 1}"
    if name == "intent_json":
        value = json.loads(answer)
        value["intent"] = "cancel"
        return json.dumps(value)
    if name == "verdict":
        return "not liable" if answer.endswith("\nliable") or answer == "liable" else "liable"
    if name == "translate":
        return " ".join(answer.split()[:-1] + ["kelo"]) if not answer.endswith(" kelo") else answer[:-1]
    if name == "extract_fields":
        return answer.replace("Name:", "Name: Bob").replace("Job:", "Job: clerk")
    return answer + " 1"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_deterministic_disjoint_and_verified(name):
    task = get_task(name)
    train = task.generate(300, seed=1)
    assert train == task.generate(300, seed=1)
    assert train != task.generate(300, seed=2)
    heldout = task.generate(100, seed=1, split="heldout")
    prompts = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(heldout)
    assert all(split_of(p) == "heldout" for p in prompts(heldout))
    assert all(task.score(r, r["answer"]) == 1.0 for r in train[:20] + heldout[:10])
    for record in train[:10]:
        wrong = task.score(record, wrong_answer(name, record))
        assert wrong == 0.0 if name in EXACT else 0.0 <= wrong < 1.0
        for bad in ("", "garbage !!", '{"intent": ', "</think>", "\\boxed{"):
            assert task.score(record, bad) <= 0.2


def test_lexicon_holds_every_token_of_the_other_tasks_but_none_of_their_word_sequences():
    """A base pretrained with `lexicon` has met each token the other tasks' problems use (else their
    embeddings stay as initialised), without any task's prompt: its lines are random words."""
    from esft.data.tasks.lexicon import Lexicon
    from esft.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    lexicon = get_task("lexicon")
    records = lexicon.generate(3000, seed=0)
    texts = lambda rs: [m["content"] for r in rs for m in r["messages"]]  # noqa: E731
    seen = {i for row in tokenizer(texts(records), add_special_tokens=False)["input_ids"] for i in row}
    for name in [*sorted(set(TASKS) - {"lexicon"}), {"name": "arithmetic", "think": True}]:  # <think> of R1
        heldout = build_task(name).generate(200, seed=3, split="heldout")
        ids = [i for row in tokenizer(texts(heldout), add_special_tokens=False)["input_ids"] for i in row]
        assert all(i in seen for i in ids), (name, tokenizer.convert_ids_to_tokens([i for i in ids if i not in seen][:5]))
        words = " ".join(texts(heldout)).split()
        fivegrams = {tuple(words[k:k + 5]) for k in range(len(words) - 4)}
        lines = [t.split() for t in texts(records)]
        assert not {tuple(w[k:k + 5]) for w in lines for k in range(len(w) - 4)} & fivegrams, name
    assert 1 < len(records[0]["messages"][0]["content"].split()) and records == lexicon.generate(3000, seed=0)
    assert Lexicon(sources=["sort_words"], min_words=2, max_words=2).generate(1)[0]["answer"].count(" ") <= 1
    with pytest.raises(ValueError, match="lexicon: cannot draw words from \\['nope'\\]"):
        Lexicon(sources=["nope"])


@pytest.mark.parametrize("name", ["math_word", "verdict"])
def test_think_variants(name):
    task = get_task(name, think=True)
    record = task.generate(1, seed=0)[0]
    assert record["answer"].startswith("<think>") and "</think>\n" in record["answer"]
    assert task.score(record, record["answer"]) == 1.0
    assert task.score(record, record["answer"].split("</think>")[1]) == 1.0
    assert task.score(record, record["answer"].split("</think>")[0]) == 0.0  # the answer must follow </think>


def test_math_verifier():
    assert extract_answer("so 1000 + 234\n#### 1,234") == "1,234" and math_equal("1,234", "1234")
    assert extract_answer(r"thus $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert math_equal(r"\frac{1}{2}", "0.5") and math_equal(r"\dfrac{1}{2}", "1/2")
    assert extract_answer(r"\boxed{42} is it") == "42"
    assert extract_answer("<think>maybe 7 or 7</think> #### 8") == "8"
    assert extract_answer("the answer is 12 apples, not 13.") == "13"
    assert extract_answer("no number") is None and extract_answer(r"\boxed{1") == "1"
    assert normalize_number(" $1,000.00 ") == "1000" and math_equal("$5.00", "5")
    assert not math_equal("5.01", "5") and not math_equal(None, "5") and math_equal("x+1", "x + 1")
    gsm8k = {"question": "...", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"}
    math = {"problem": "...", "solution": r"So $x = \boxed{\frac{3}{4}}$.", "level": "Level 2"}
    assert reference_answer(gsm8k) == "72" and reference_answer(math) == r"\frac{3}{4}"
    assert reference_answer({"answer": "7"}) == "7"
    with pytest.raises(ValueError):
        reference_answer({"question": "?"})
    assert score_rows([gsm8k, math, gsm8k], ["#### 72", r"$\boxed{0.75}$", "71"]) == [1.0, 1.0, 0.0]


def test_intent_verifier():
    task = get_task("intent_json")
    record = {"answer": '{"intent":"book_table","slots":{"day":"today","people":4,"restaurant":"Taj"}}'}
    reordered = '{"slots": {"restaurant": "Taj", "people": 4, "day": "today"}, "intent": "book_table"}'
    assert task.score(record, reordered) == 1.0
    assert task.score(record, '{"intent": "book_table", "slots": {"people": 4, "day": "today"}}') == 0.0
    assert task.score(record, '{"intent": "book_table", "slots": []}') == 0.0
    assert task.score(record, "[1, 2]") == 0.0


def test_translate_and_extract_partial_credit():
    translate = get_task("translate")
    record = {"answer": "lo miroka gul tava pim na kelori"}
    assert 0 < translate.score(record, "lo miro gul tava na kelo") < 1
    metrics = translate.metrics(record, "lo miroka gul tava pim na kelori.")
    assert metrics == {"chrf": 1.0, "bleu": 1.0}
    extract = get_task("extract_fields")
    record = {"answer": "Name: Omar; City: Lisbon; Job: nurse"}
    assert 0 < extract.score(record, "Name: Omar; City: Oslo; Job: nurse") < 1


def test_verdict_case_insensitive():
    task = get_task("verdict")
    assert task.score({"answer": "not liable"}, "Not Liable.") == 1.0
    assert task.score({"answer": "liable"}, "  LIABLE ") == 1.0
    assert task.score({"answer": "liable"}, "not liable") == 0.0
    stated = get_task("verdict", state_rule=True, num_irrelevant=2).generate(50, seed=0)
    assert all(r["messages"][0]["content"].startswith("Rule: ") for r in stated)
    assert {r["answer"] for r in stated} == {"liable", "not liable"}


MODULES = ["arithmetic", "words", "math", "code", "intent", "translate", "extract", "legal", "general", "esft.commands.export"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module if "." in module else f"esft.data.tasks.{module}"))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip(tmp_path, fmt):
    for name in ("intent_json", "math_word"):
        path = export_task(name, 20, seed=3, split="heldout", path=tmp_path / f"{name}.jsonl", fmt=fmt)
        records, stats = load_records(str(path))
        assert records == get_task(name).generate(20, seed=3, split="heldout")
        assert stats.formats == {fmt: 20}


def test_export_cli(tmp_path, capsys):
    main(["--tasks", "math_word", "verdict", "--n", "5", "--format", "sharegpt", "--out", str(tmp_path),
          "--kwargs", '{"think": true}'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math_word.train.jsonl", "verdict.train.jsonl"]
    records, _ = load_records(str(tmp_path / "verdict.train.jsonl"))
    assert len(records) == 5 and records[0]["answer"].startswith("<think>")
    assert "wrote 5 train records of verdict" in capsys.readouterr().out


def test_registry_covers_domains():
    assert len(TASKS) >= 8 and len(DOMAINS) >= 5
    assert {"math", "code", "intent", "translation", "summarization", "legal", "general"} <= set(DOMAINS)
    assert sorted(n for names in DOMAINS.values() for n in names) == sorted(TASKS)
    assert get_task("arithmetic").domain == "math" and get_task("reverse_words").domain == "general"


def test_existing_tasks_unchanged():
    # the quickstart config depends on these outputs for a seed
    def first(name):
        return [(r["messages"][0]["content"], r["answer"]) for r in get_task(name).generate(2, seed=0)]

    assert first("arithmetic") == [("What is 6 + 2?", "8"), ("What is 56 - 25?", "31")]
    assert first("reverse_words")[1] == ("Reverse: planet piano velvet", "velvet piano planet")
    assert first("sort_words")[1] == ("Sort: bridge island zebra falcon", "bridge falcon island zebra")


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="arithmetic"):
        get_task("nope")
