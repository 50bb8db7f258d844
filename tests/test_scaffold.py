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
    commands = {"esft.cli", *PROJECT_COMMANDS.values()}
    for path in sorted((ROOT / "esft" / package).rglob("*.py")):
        hits = imported_modules(path) & commands
        assert not hits, f"{path.relative_to(ROOT)} imports the command module(s) {sorted(hits)}"
