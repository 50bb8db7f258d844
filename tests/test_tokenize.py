import pytest

from esft.data.records import DataFormatError
from esft.data.tokenize import IGNORE_INDEX, tokenize_records

CONV = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "Reverse: apple river"},
    {"role": "assistant", "content": "river apple"},
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "3"},
]}


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_every_assistant_turn_and_only_assistant_turns_are_trained(tokenizer):
    [example], stats = tokenize_records([CONV], tokenizer, max_length=512)
    # the newline after <|im_end|> is template scaffolding, not the answer
    assert trained_text(tokenizer, example) == "river apple<|im_end|>3<|im_end|>"
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for label in example["labels"])
    assert example["length"] == len(example["input_ids"]) == len(example["labels"])


def test_train_on_all(tokenizer):
    [example], _ = tokenize_records([CONV], tokenizer, max_length=512, train_on="all")
    assert example["labels"] == example["input_ids"]


def test_truncation_policies(tokenizer):
    [full], _ = tokenize_records([CONV], tokenizer, max_length=512)
    n = full["length"] - 2  # cuts into the last assistant turn
    [cut], stats = tokenize_records([CONV], tokenizer, max_length=n)
    assert cut["input_ids"] == full["input_ids"][:n] and stats.truncated == 1
    examples, stats = tokenize_records([CONV], tokenizer, max_length=n, truncation="drop")
    assert examples == [] and stats.dropped == {"longer than max_length": 1}
    with pytest.raises(DataFormatError, match="exceed max_length"):
        tokenize_records([CONV], tokenizer, max_length=n, truncation="error")


def test_example_left_without_trained_tokens_is_dropped_and_counted(tokenizer):
    examples, stats = tokenize_records([CONV], tokenizer, max_length=5)
    assert examples == [] and stats.dropped == {"no trained tokens (after truncation)": 1}


def test_template_that_rewrites_history_gives_one_example_per_turn(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # renders only the last assistant turn in full: not prefix-stable
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
        "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    examples, stats = tokenize_records([CONV], tok, max_length=512)
    texts = [tok.decode(e["input_ids"]) for e in examples]
    assert texts == [
        "system: be brief\nuser: Reverse: apple river\nassistant: river apple\n",
        "system: be brief\nuser: Reverse: apple river\n[old]user: What is 1 + 2?\nassistant: 3\n",
    ]
    # no end-of-turn marker: the turn's newline is its end; " river" straddles the prompt's space
    assert [trained_text(tok, e) for e in examples] == [" river apple\n", "3\n"]
    assert stats.examples == 2
    last, _ = tokenize_records([CONV], tok, max_length=512, multiturn="last")
    assert last == examples[1:]


def test_truncation_error_names_the_records_file_and_line(tokenizer):
    from esft.data.records import Record

    record = Record({**CONV, "id": "abc"}, origin="data/train.jsonl:7")
    with pytest.raises(DataFormatError, match=r"^data/train\.jsonl:7: \d+ tokens exceed max_length=8 \(truncation='error'\)$"):
        tokenize_records([record], tokenizer, max_length=8, truncation="error")
