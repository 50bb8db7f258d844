"""Every YAML under configs/ parses, and each starts with the command that runs it."""

from pathlib import Path

import pytest
import yaml

from esft.cli import main

CONFIGS_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))


def contains(full, part) -> bool:
    """`part` (a YAML overlay) is in `full` (a printed config that adds the defaults)."""
    if isinstance(part, dict):
        return isinstance(full, dict) and all(k in full and contains(full[k], v) for k, v in part.items())
    return full == part


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_parses_and_names_its_command(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# esft ") and str(path.relative_to(path.parents[2])) in first
    # configs/distributed/ holds trainer overlays, used after a full config
    base = ["--config", str(CONFIGS_DIR / "sft" / "quickstart.yaml")] if path.parent.name == "distributed" else []
    if path.parent.name == "pipelines":  # a list of stages, checked in tests/test_pipeline.py
        from esft.commands.pipeline import load_pipeline

        assert load_pipeline(path)["stages"]
        return
    if "stages" in yaml.safe_load(path.read_text()):  # a base config (configs/base/), tests/test_base.py
        from esft.commands.base import load_base

        assert all(Path(stage["fit"]).is_file() for stage in load_base(path)["stages"])
        return
    with pytest.raises(SystemExit) as e:
        main(["fit", *base, "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("esft.")
    assert printed["data"]["class_path"].startswith("esft.")
    assert "tokenizer_name" not in printed["data"]["init_args"]  # derived from the model's, not set
    if path.parent.name == "distributed":
        assert contains(printed["trainer"], yaml.safe_load(path.read_text())["trainer"])


def test_bad_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS[0]), "--data.init_args.train_on", "everything"])
    assert e.value.code != 0
    assert "train_on" in capsys.readouterr().err
