"""The package's shape: layers that import one way, no cycles, no oversized modules.

Imports are read from the source (every ``import`` statement, lazy ones inside functions
included), so a cycle hidden by a lazy import fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_phantom"
# Lower layers never import higher ones. Modules of one layer may import each other (acyclically).
LAYERS = {"_checks": 0, "ops": 1, "nn": 2, "cost": 3, "strategy": 4, "energy": 4, "app": 5}
TOP = 6  # lightning_phantom/__init__.py, __main__.py, compare.py: entry points
CORE = ("ops", "nn")  # torch only: usable without Lightning
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports (a package import counts as its ``__init__``)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_imports_run_one_way():
    upward = [(a, b) for a, deps in _graph().items() for b in deps
              if _layer(b) > _layer(a) and not (a.count(".") == 1 and b.startswith(a + "."))]
    assert not upward, f"modules importing a higher layer: {upward}"


def test_core_imports_no_lightning():
    offenders = []
    for name, path in _modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in CORE:
            if re.search(r"^\s*(import|from) lightning(\.|\s)", path.read_text(), flags=re.M):
                offenders.append(name)
    assert not offenders, f"core modules importing Lightning: {offenders}"


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle of ideas: drop those edges.
    edges = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (at most {MAX_LINES})"


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from lightning_phantom.app.cli import main\n")
    assert "lightning_phantom.app.cli" in _imports("lightning_phantom.ops.m", fake, set(_modules()))
