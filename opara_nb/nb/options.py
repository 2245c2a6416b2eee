"""Parsed ``%%opara`` options in a small dataclass, and finding the model and inputs a cell assigned."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["CellOptions", "assigned_names", "changed_names", "split_names", "parse_kwargs", "find_model",
           "find_inputs", "usage_error", "CELL_USAGE"]


def usage_error(message: str) -> Exception:
    """IPython's UsageError (imported here, never by the core): shown to the user without a traceback."""
    from IPython.core.error import UsageError

    return UsageError(message)


@dataclass
class CellOptions:
    """``%opara`` / ``%%opara`` options once parsed and checked (see ``OparaMagics.opara`` for their meaning)."""

    model: str | None = None
    inputs: list[str] = field(default_factory=list)
    kwargs: dict[str, str] = field(default_factory=dict)
    strategy: str = "auto"
    order: str = ""
    fuse: bool = False
    plan: str | None = None
    max_memory_mb: float | None = None
    max_streams: int | None = None
    reprofile: bool = False
    graph: bool = True
    bench: bool = False
    dashboard: bool = False
    quiet: bool = False
    verbose: bool = False
    return_result: bool = False
    store_as: str | None = None


def split_names(text: str | None) -> list[str]:
    """``"x, y"`` -> ``["x", "y"]``; each must be a Python identifier."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise usage_error(f"{bad[0]!r} is not a variable name: pass variables, e.g. --inputs x,y")
    return names


def parse_kwargs(text: str | None) -> dict[str, str]:
    """``"mask=m, k=v"`` -> ``{"mask": "m", "k": "v"}`` (values are variable names)."""
    out = {}
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier() or not value.strip().isidentifier():
            raise usage_error(f"--kwargs takes NAME=VARIABLE pairs, e.g. --kwargs mask=mask; got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _targets(node: ast.AST) -> list[ast.Name]:
    if isinstance(node, ast.Name):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [n for elt in node.elts for n in _targets(elt)]
    if isinstance(node, ast.Starred):
        return _targets(node.value)
    return []


def assigned_names(source: str) -> list[str]:
    """Names the cell's top-level statements bind, in order of first assignment (``x = ...``, ``for x``, ``with as``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        targets = _bound_by(node)
        found += [(n.lineno, n.col_offset, n.id) for t in targets for n in _targets(t)]
    names: list[str] = []
    # ast.walk is breadth-first; sorting by position gives the order in which the cell assigns.
    for _, _, n in sorted(found):
        if n not in names:
            names.append(n)
    return names


def _bound_by(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor, ast.NamedExpr)):
        return [node.target]
    if isinstance(node, ast.withitem) and node.optional_vars is not None:
        return [node.optional_vars]
    return []


def changed_names(ns: Mapping[str, Any], before: Mapping[str, Any], source: str) -> list[str]:
    """Variables the cell bound to a new object: the assigned names first (in order), then any other change."""
    missing = object()
    changed = [k for k in ns if not k.startswith("_") and ns[k] is not before.get(k, missing)]
    ordered = [n for n in assigned_names(source) if n in changed]
    return ordered + [n for n in changed if n not in ordered]


CELL_USAGE = "%%opara MODEL --inputs X"


def find_model(ns: Mapping[str, Any], name: str | None, changed: list[str], usage: str = CELL_USAGE) -> str:
    """The variable holding the model: ``name`` when given, else the one nn.Module the cell assigned.

    ``usage`` is the form the error messages suggest (the magic the user typed)."""
    import torch

    if name:
        if name not in ns:
            where = "in the cell or an earlier one" if usage == CELL_USAGE else "in an earlier cell"
            raise usage_error(f"no variable named {name!r}: assign it {where}, or name the model variable: {usage}")
        if not isinstance(ns[name], torch.nn.Module):
            raise usage_error(f"{name!r} is a {type(ns[name]).__name__}, not a torch.nn.Module: name the model "
                              f"variable: {usage}")
        return name
    modules = [n for n in changed if isinstance(ns[n], torch.nn.Module)]
    if not modules:
        raise usage_error("the cell assigned no torch.nn.Module: name the model variable: %%opara MODEL --inputs X")
    if len(modules) > 1:
        raise usage_error(f"the cell assigned several nn.Modules ({', '.join(modules)}): name the one to optimize: "
                          f"%%opara {modules[0]} --inputs X")
    return modules[0]


def find_inputs(ns: Mapping[str, Any], names: list[str], changed: list[str], model: str,
                keywords: Iterable[str] = ()) -> list[str]:
    """The names of the example inputs: ``names`` when given (each must exist), else the tensors the cell assigned
    (in assignment order) but those passed as keyword inputs (``keywords``: ``--kwargs mask=mask``)."""
    import torch

    if names:
        unknown = [n for n in names if n not in ns]
        if unknown:
            raise usage_error(f"no variable named {unknown[0]!r}: --inputs takes the names of existing variables")
        return list(names)
    tensors = [n for n in changed if n != model and n not in set(keywords) and isinstance(ns[n], torch.Tensor)]
    if not tensors:
        raise usage_error("no input tensors found: the cell assigned none; name the example inputs: "
                          f"%%opara {model} --inputs x[,y]")
    return tensors
