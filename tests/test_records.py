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


@pytest.mark.parametrize("name, body", [
    ("d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n'),
    ("d.json", b'[{"prompt": "a", "response": "b"},\n {"prompt": "caf\xe9", "response": "b"}]\n'),
    ("d.csv", b"prompt,response\ncaf\xe9,b\n"),
])
def test_a_file_that_is_not_utf8_names_file_line_and_column(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body)  # latin-1 "é"
    column = body.split(b"\n")[1].index(b"\xe9") + 1
    with pytest.raises(DataFormatError) as e:
        load_records(str(path))
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at column {column}); re-save the file as UTF-8"


@pytest.mark.parametrize("name, text", [
    ("d.jsonl", '{"prompt": "a", "response": "b"}\n'),
    ("d.json", '[{"prompt": "a", "response": "b"}]'),
    ("d.csv", "prompt,response\na,b\n"),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    [record], _ = load_records(str(path))
    assert record["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_prompt_response_format_names_the_missing_response(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(DataFormatError) as e:
        load_records(str(path), fmt="prompt_response")
    assert str(e.value) == f"{path}:2: field 'response' is missing"


def test_csv_cells_are_text_and_only_empty_cells_are_missing(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("prompt,response,answer,id\nWhat is 3 + 4?,007,007,0012\nNA,null,1.50,\n")
    records, _ = load_records(str(path))
    assert records[0]["messages"][1]["content"] == "007"
    assert records[0]["answer"] == "007" and records[0]["id"] == "0012"
    assert [m["content"] for m in records[1]["messages"]] == ["NA", "null"]
    assert records[1]["answer"] == "1.50" and "id" not in records[1]


@pytest.mark.parametrize("source", ["data/trian", "data/trian.jsonl", "runs/x/train", "trian.jsonl", "./trian", "data\\trian"])
def test_a_misspelt_local_path_is_a_missing_file_not_a_hub_lookup(tmp_path, monkeypatch, source):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError(f"looked up on the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_records(source)
    assert str(e.value) == f"{source}: no such file or directory"


def test_records_remember_their_file_and_line_and_stay_plain_dicts(tmp_path):
    import copy
    import pickle

    from esft.data.records import origin

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": ""}, {"prompt": "c", "response": "d"}])
    [record], _ = load_records(str(path), on_bad_record="skip")
    assert origin(record) == f"{path}:2" and origin(pickle.loads(pickle.dumps(record))) == f"{path}:2"
    assert origin(copy.deepcopy(record)) == f"{path}:2"
    assert record == to_record({"prompt": "c", "response": "d"}) | {"source": str(path)}
    assert json.loads(json.dumps(record)) == record
