import pytest
import torch

from esft.checkpoint import AtomicCheckpointIO


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    restored = io.load_checkpoint(path)
    assert restored["step"] == 1 and torch.equal(restored["w"], torch.ones(3))


def test_a_full_disk_during_a_save_names_the_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a file object raises it

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as e:
        io.save_checkpoint({"step": 2}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1


def run_cli(monkeypatch, capsys, *argv: str) -> str:
    """`esft ARGV` in this process; asserts that it ends with status 2 and returns the error line."""
    from esft.cli import run

    monkeypatch.setattr("sys.argv", ["esft", *argv])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", [
    ["eval", "--tasks", "arithmetic", "--model"],
    ["experts", "save", "--out", "adapter", "--ckpt"],
    ["distill-data", "responses", "--tasks", "arithmetic", "--out", "seqkd.jsonl", "--teacher"],
], ids=["eval", "experts", "distill-data"])
def test_project_commands_end_with_one_line_for_an_unreadable_checkpoint(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    line = run_cli(monkeypatch, capsys, *command, str(bad))
    assert line.startswith(f"esft: error: {bad}: cannot be loaded as a checkpoint (")
    line = run_cli(monkeypatch, capsys, *command, str(tmp_path / "nope.ckpt"))
    assert line == f"esft: error: {tmp_path / 'nope.ckpt'}: no such checkpoint file"


def test_a_misspelt_model_directory_is_missing_not_a_hub_lookup(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for command in (["eval", "--tasks", "arithmetic", "--model"], ["experts", "score", "--out", "s", "--model"]):
        assert run_cli(monkeypatch, capsys, *command, "runs/quickstrat") == "esft: error: runs/quickstrat: no such model directory"


def test_an_unreadable_model_directory_names_it(tmp_path, monkeypatch, capsys):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{ not json")
    line = run_cli(monkeypatch, capsys, "eval", "--tasks", "arithmetic", "--model", str(model))
    assert line.startswith(f"esft: error: {model}: cannot be loaded as a checkpoint (")
