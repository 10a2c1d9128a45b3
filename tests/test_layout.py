"""The package layout holds: no import cycle between modules or between the worker side's
packages, each package imports only the packages below it, and the agent-side ``producer``
never reaches the worker side (statically here, at run time here and in
tests/producer/test_base_install.py).

Every import statement counts, including ones inside functions and under TYPE_CHECKING: a
lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("producer", "sandboxes", "audit", "workers")
# What each top-level package may import (besides itself).
ALLOWED = {
    "producer": set(),
    "sandboxes": {"producer"},
    "audit": {"producer"},
    "workers": {"producer", "sandboxes", "audit"},
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("sandboxes", "image"):
                continue  # runs inside the sandbox container, not an importable module
            name = ".".join(rel.with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Per module: (imported module, names taken from it) for every import statement."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for name, path in _modules().items():
        found[name] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found[name] += [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found[name].append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import; the project imports absolutely")
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, statements in _imports().items():
        for module, names in statements:
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in modules and target != name:
                    edges[name].add(target)
        edges.setdefault(name, set())
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _group(module: str) -> str:
    """A top-level package, or one package or module directly under ``workers``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "workers" and len(parts) > 1 else parts[0]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_import_of_the_project_names_an_existing_module() -> None:
    """A lazy import of a moved module fails only when its line runs: find them all."""
    modules = _modules()
    missing = sorted(
        (name, module)
        for name, statements in _imports().items()
        for module, _ in statements
        if module.split(".")[0] in PACKAGES and module not in modules
    )
    assert missing == []


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_each_package_imports_only_the_packages_below_it() -> None:
    wrong = sorted(
        (module, target)
        for module, targets in _graph().items()
        for target in targets
        if (a := module.split(".")[0]) != (b := target.split(".")[0]) and b not in ALLOWED[a]
    )
    assert wrong == [], "imports against the layering (docs/architecture.md)"


def test_the_worker_side_packages_form_no_cycle() -> None:
    groups: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _group(module) != _group(target):
                groups[_group(module)].add(_group(target))
    assert _cycles(groups) == []


def test_every_package_says_what_lives_there() -> None:
    for name, path in _modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.split()) >= 10, f"{name}: __init__ needs a docstring"


def test_importing_every_producer_module_loads_nothing_of_the_worker_side() -> None:
    producer_modules = sorted(m for m in _modules() if m.split(".")[0] == "producer")
    probe = (
        "import importlib, json, sys\n"
        f"for m in {producer_modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m.split('.')[0] in ('workers', 'sandboxes', 'audit'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
