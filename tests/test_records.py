import json

import pytest

from esft.data.records import DataFormatError, load_records, to_record


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row, messages",
    [
        ({"prompt": "p", "response": "r"}, [("user", "p"), ("assistant", "r")]),
        ({"prompt": "p", "completion": "r", "system": "s"}, [("system", "s"), ("user", "p"), ("assistant", "r")]),
        ({"instruction": "i", "input": "x", "output": "o"}, [("user", "i\n\nx"), ("assistant", "o")]),
        ({"instruction": "i", "input": "", "output": "o"}, [("user", "i"), ("assistant", "o")]),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                          {"role": "assistant", "content": "d"}]},
            [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
        ),
        (
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}]},
            [("system", "s"), ("user", "a"), ("assistant", "b")],
        ),
    ],
)
def test_formats_auto_detected(row, messages):
    record = to_record(row)
    assert [(m["role"], m["content"]) for m in record["messages"]] == messages


def test_passthrough_fields():
    record = to_record({"prompt": "p", "response": "r", "task": "math", "answer": 3, "id": 7})
    assert record["task"] == "math" and record["answer"] == 3 and record["id"] == "7"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "response": "  "}, "field 'response' is empty"),
        ({"prompt": "p", "response": None}, "field 'response' is missing"),
        ({"instruction": "i", "output": 5}, "field 'output' must be a string"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role is 'robot'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "'content' is empty"),
        ({"conversations": []}, "non-empty list"),
        ({"question": "q"}, "cannot detect the format"),
    ],
)
def test_bad_rows_name_where_and_field(row, message):
    with pytest.raises(DataFormatError) as e:
        to_record(row, where="data.jsonl:3")
    assert str(e.value).startswith("data.jsonl:3: ") and message in str(e.value)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: malformed JSON"):
        load_records(str(path))
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: malformed JSON"):
        load_records(str(path), on_bad_record="skip")  # a broken file is never skipped silently


def test_empty_response_errors_or_is_counted_under_skip(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""},
                                             {"prompt": "c", "response": "d"}])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: field 'response' is empty"):
        load_records(str(path))
    records, stats = load_records(str(path), on_bad_record="skip")
    assert len(records) == 2 and stats.read == 3 and stats.num_skipped == 1
    assert stats.skipped == {"field 'response' is empty": 1}
    assert "d.jsonl:2" in stats.examples[0]


def test_json_parquet_csv_and_directory(tmp_path):
    import pandas as pd

    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame([{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}]).to_csv(tmp_path / "c.csv", index=False)
    write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}])
    assert len(load_records(str(tmp_path / "a.json"))[0]) == 3
    assert load_records(str(tmp_path / "b.parquet"))[0][1]["messages"][1]["content"] == "o1"
    csv_records, _ = load_records(str(tmp_path / "c.csv"))
    assert csv_records[1]["messages"][0]["content"] == "q"
    records, stats = load_records(str(tmp_path))
    assert len(records) == 3 + 3 + 2 + 1
    assert stats.formats == {"alpaca": 6, "prompt_response": 2, "sharegpt": 1}


def test_csv_bad_row_names_its_line(tmp_path):
    (tmp_path / "c.csv").write_text("prompt,response\np,r\nq,\n")
    with pytest.raises(DataFormatError, match=r"c\.csv:line 3: field 'response' is missing"):
        load_records(str(tmp_path / "c.csv"))


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_records(str(tmp_path / "x.txt"))


def test_hub_ids_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return [{"prompt": "p", "response": "r"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, _ = load_records("org/some-dataset", split="train", name="main")
    assert calls == [("org/some-dataset", "main", "train")] and records[0]["messages"][1]["content"] == "r"
