"""The package's floors: commands on top (`esft.cli`, `esft.commands.*`), libraries below them;
no library imports a command, and no import circle among module-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import esft

ROOT = Path(esft.__file__).parent
COMMANDS = ("esft.cli", "esft.commands")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """The esft modules `name` imports (all imports, or only those run at import time)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, including under `if`/`try` at module level
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def test_no_library_module_imports_a_command():
    modules = _modules()
    assert "esft.commands.sweep" in modules and "esft.data.datamodule" in modules
    bad = {name: sorted(i for i in _imports(name, path, modules, top_level_only=False) if _is_command(i))
           for name, path in modules.items() if not _is_command(name)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules, top_level_only=True) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                # a package importing its own submodule from __init__ is how packages export names
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
