"""The layout promises of docs/architecture.md: no import cycles, dependencies point down, the core imports no
notebook libraries, the scheduling core imports no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "opara_nb"
# Layers, lowest first: a module may import (at module level) only from its own layer or lower ones.
LAYERS = [
    {"errors", "_optional", "_tensors", "progress", "schedule", "models", "testing"},
    {"capture"},
    {"profiling"},
    {"pipeline", "planfile"},
    {"runtime"},
    {"backend", "api", "bench", "viz", "tune"},
    {"nb", "cli", "__main__", "__init__"},
]
CORE = ("capture", "profiling", "schedule", "runtime", "pipeline", "api")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, node: ast.AST, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = module.split(".") if mods[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    prefix = ".".join(base + ([node.module] if node.module else []))
    subs = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in mods]
    return subs if subs and not node.module else [prefix, *subs]


def _module_level_imports() -> dict[str, set[str]]:
    """module -> opara_nb modules it imports when it is imported (imports inside functions are lazy by design)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    break
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    deps |= {t for t in _targets(name, sub, mods) if t in mods and t != name}
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if top.removesuffix(".py") in layer)


def test_no_import_cycle_inside_the_package():
    graph = _module_level_imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            if not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)


def test_dependencies_point_down():
    upward = [f"{m} -> {d}" for m, deps in _module_level_imports().items() for d in deps
              if d != "opara_nb" and _layer(d) > _layer(m)]
    assert not upward, upward


def test_the_scheduling_core_imports_only_itself():
    outside = [f"{m} -> {d}" for m, deps in _module_level_imports().items() if m.startswith("opara_nb.schedule")
               for d in deps if not d.startswith("opara_nb.schedule")]
    assert not outside, outside
    for path in (ROOT / "schedule").glob("*.py"):
        assert "import torch" not in path.read_text() and "from torch" not in path.read_text(), path.name


def test_the_core_imports_no_notebook_library():
    code = ("import sys, opara_nb, opara_nb.api, opara_nb.runtime, opara_nb.capture, opara_nb.profiling, "
            "opara_nb.pipeline, opara_nb.schedule, opara_nb.backend; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipywidgets', 'graphviz')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for package in CORE:
        for path in ((ROOT / package).glob("*.py") if (ROOT / package).is_dir() else [ROOT / f"{package}.py"]):
            text = path.read_text()
            assert "import IPython" not in text and "from IPython" not in text and "ipywidgets" not in text, path
