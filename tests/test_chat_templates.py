"""Assistant-only masking under the chat templates of the main model families (tokenizer only)."""

import copy

import pytest

from esft.data.tokenize import IGNORE_INDEX, tokenize_records
from esft.models.chat_templates import FAMILIES, resolve_chat_template

SYSTEM = "You are terse."
PROMPTS = ["Reverse: apple river", "What is 1 + 2?", "Say ok."]
CONV = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": PROMPTS[0]},
    {"role": "assistant", "content": "river apple"},
    {"role": "user", "content": PROMPTS[1]},
    {"role": "assistant", "content": "3"},
]}
# reasoning in the first two answers, none in the last
THINK = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": PROMPTS[0]},
    {"role": "assistant", "content": "<think>\nswap the words\n</think>\n\nriver apple"},
    {"role": "user", "content": PROMPTS[1]},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n3"},
    {"role": "user", "content": PROMPTS[2]},
    {"role": "assistant", "content": "ok"},
]}


@pytest.fixture(scope="module")
def family_tokenizer(tokenizer):
    """The built-in tokenizer with a family's template and special tokens (as the family's own has)."""
    cache = {}

    def make(name):
        if name not in cache:
            tok = copy.deepcopy(tokenizer)
            tok.add_special_tokens({"additional_special_tokens": list(FAMILIES[name].special_tokens)})
            tok.chat_template = resolve_chat_template(name, tok)
            cache[name] = tok
        return cache[name]

    return make


def trained(tok, example):
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def untrained(tok, example):
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])


@pytest.mark.parametrize("name, expected", [
    ("chatml", ["river apple<|im_end|>3<|im_end|>"]),
    ("qwen2.5", ["river apple<|im_end|>3<|im_end|>"]),
    ("llama3", ["river apple<|eot_id|>3<|eot_id|>"]),
    ("gemma", ["river apple<end_of_turn>3<end_of_turn>"]),
    ("phi3", ["river apple<|end|>3<|end|>"]),
    ("deepseek_r1", ["river apple<｜end▁of▁sentence｜>3<｜end▁of▁sentence｜>"]),
    # the space Mistral puts before an answer belongs to the answer's first token
    ("mistral", [" river apple</s> 3</s>"]),
])
def test_stable_families_train_exactly_each_answer_and_its_end_of_turn_marker(family_tokenizer, name, expected):
    tok = family_tokenizer(name)
    examples, stats = tokenize_records([CONV], tok, max_length=512)
    assert [trained(tok, e) for e in examples] == expected
    prompt_side = untrained(tok, examples[-1])
    assert all(p in prompt_side for p in PROMPTS[:2])
    # Mistral renders the system prompt only before a final user turn: counted, never silent
    assert (SYSTEM in prompt_side) == (name != "mistral")
    assert stats.system_not_rendered == (name == "mistral")


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(family_tokenizer):
    tok = family_tokenizer("gemma")
    [example], _ = tokenize_records([CONV], tok, max_length=512)
    assert untrained(tok, example).startswith(f"<bos><start_of_turn>user\n{SYSTEM}\n\n{PROMPTS[0]}<end_of_turn>\n")


def test_mistral_answer_starts_after_inst_with_or_without_a_system_prompt(family_tokenizer):
    tok = family_tokenizer("mistral")
    with_system, _ = tokenize_records([CONV], tok, max_length=512)
    without, stats = tokenize_records([{"messages": CONV["messages"][1:]}], tok, max_length=512)
    assert with_system == without and stats.system_not_rendered == 0


def test_qwen25_default_system_prompt_is_prompt_not_target(family_tokenizer):
    tok = family_tokenizer("qwen2.5")
    [example], _ = tokenize_records([{"messages": CONV["messages"][1:]}], tok, max_length=512)
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in untrained(tok, example)
    assert trained(tok, example) == "river apple<|im_end|>3<|im_end|>"


@pytest.mark.parametrize("name, marker", [("qwen3", "<|im_end|>"), ("deepseek_r1", "<｜end▁of▁sentence｜>")])
def test_history_rewriting_families_train_each_turn_against_the_history_at_that_turn(family_tokenizer, name, marker):
    tok = family_tokenizer(name)
    examples, _ = tokenize_records([THINK], tok, max_length=512)
    last = "<think>\n\n</think>\n\nok" if name == "qwen3" else "ok"  # Qwen3 always opens the final turn with a think block
    assert [trained(tok, e) for e in examples] == [
        f"<think>\nswap the words\n</think>\n\nriver apple{marker}",
        f"<think>\nadd them\n</think>\n\n3{marker}",
        f"{last}{marker}",
    ]
    # each example shows the earlier answers as the template renders them then: without reasoning
    assert "swap the words" not in tok.decode(examples[1]["input_ids"])
    assert "river apple" in untrained(tok, examples[1]) and "3" in untrained(tok, examples[2])
    [only], _ = tokenize_records([THINK], tok, max_length=512, multiturn="last")
    assert only == examples[-1]


def test_generation_blocks_decide_what_is_trained(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # marks the answer but not its end marker: the prefix rendering would train <|im_end|> too
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    [example], stats = tokenize_records([CONV], tok, max_length=512)
    assert trained(tok, example) == "river apple3"
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for label in example["labels"])


def test_family_template_needs_the_familys_special_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"^chat_template 'llama3': tokenizer .* has no single token for <\|begin_of_text\|>"):
        resolve_chat_template("llama3", tokenizer)


def test_chat_template_from_a_file_or_jinja_text_and_clear_errors(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_chat_template(str(path), tokenizer) == path.read_text()
    assert resolve_chat_template("{{ 'x' }}", tokenizer) == "{{ 'x' }}"
    assert resolve_chat_template("chatml", tokenizer) == tokenizer.chat_template
    with pytest.raises(FileNotFoundError, match=r"no such template file: .*missing\.jinja$"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), tokenizer)
    with pytest.raises(ValueError, match="neither a family"):
        resolve_chat_template("llama4", tokenizer)


def test_template_error_names_the_record(family_tokenizer):
    from esft.data.records import DataFormatError, Record

    record = Record({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                  {"role": "assistant", "content": "c"}]}, origin="chat.jsonl:4")
    with pytest.raises(DataFormatError, match=r"^chat\.jsonl:4: chat template error: .*alternate"):
        tokenize_records([record], family_tokenizer("gemma"), max_length=512)
