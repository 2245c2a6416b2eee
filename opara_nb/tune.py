"""Name a model and its example inputs outside Python: for ``python -m opara_nb tune`` and for servers that load plans.

    model = build_model("mypkg.models:build", device="cuda")          # or "path/to/models.py:build"
    args, kwargs = parse_inputs("randn(1,3,224,224)", device="cuda")
    args, kwargs = parse_inputs("randint(0,1000,(8,128)), mask=ones(8,128,dtype=bool)")

The factory is the only code that runs: inputs are read from a small expression language (tensor makers such as
``randn(...)``, numbers, strings, tuples, lists, dicts and ``name=value`` keywords), never evaluated as Python.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import OparaUsageError, one_line

__all__ = ["load_factory", "build_model", "parse_inputs", "MAKERS", "INPUTS_EXAMPLE"]

# The tensor makers ``--inputs`` knows; each takes torch's arguments for it (sizes, dtype=...).
MAKERS: dict[str, Callable[..., torch.Tensor]] = {
    "randn": torch.randn, "rand": torch.rand, "zeros": torch.zeros, "ones": torch.ones, "full": torch.full,
    "randint": torch.randint, "arange": torch.arange,
}
INPUTS_EXAMPLE = '"randn(1,3,224,224)" or "randint(0,1000,(8,128)), mask=ones(8,128,dtype=bool)"'


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable ``spec`` names: ``package.module:function`` (imported) or ``path/to/file.py:function``."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise OparaUsageError(f"--factory {spec!r}: write module:function, e.g. mypkg.models:build or "
                              "path/to/models.py:build")
    module = _import(source)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OparaUsageError(f"--factory {spec!r}: {source} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OparaUsageError(f"--factory {spec!r}: {attr} is a {type(obj).__name__}, not something to call")
    return obj


def _import(source: str) -> Any:
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise OparaUsageError(f"--factory: no file {source}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules.setdefault(path.stem, module)  # so pickling (and Ray) find classes defined there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise OparaUsageError(f"--factory: cannot import {source} ({exc}); is it installed or on PYTHONPATH?") \
            from None


def build_model(factory: str | Callable[[], Any], device: str = "cpu", seed: int | None = 0) -> Any:
    """Call the factory (under ``seed``, so every process builds the same random weights) and return the model in
    eval mode on ``device``."""
    make = load_factory(factory) if isinstance(factory, str) else factory
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = make()
    if isinstance(model, torch.nn.Module):
        return model.eval().to(device)
    if not callable(model):
        raise OparaUsageError(f"the factory returned a {type(model).__name__}: it must return the model "
                              "(a torch.nn.Module)")
    return model


def parse_inputs(text: str, device: str = "cpu", seed: int | None = 0) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from an inputs expression (see the module doc); random tensors are drawn from ``seed``."""
    try:
        call = ast.parse(f"_({text})", mode="eval").body  # the inputs, read as the arguments of a call
    except SyntaxError as exc:
        raise OparaUsageError(f"--inputs {text!r} is not a list of inputs ({exc.msg}): write e.g. "
                              f"{INPUTS_EXAMPLE}") from None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "_":
        raise OparaUsageError(f"--inputs {text!r} is not a list of inputs: write e.g. {INPUTS_EXAMPLE}")
    if any(k.arg is None for k in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args):
        raise OparaUsageError(f"--inputs {text!r}: * and ** are not supported; name each input")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        args = tuple(_value(a, device, text) for a in call.args)
        kwargs = {k.arg: _value(k.value, device, text) for k in call.keywords}
    if not args and not kwargs:
        raise OparaUsageError(f"--inputs is empty: give the model's example inputs, e.g. {INPUTS_EXAMPLE}")
    return args, kwargs


def _value(node: ast.expr, device: str, text: str) -> Any:
    if isinstance(node, ast.Call):
        return _tensor(node, device, text)
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(v, device, text) for v in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_literal(k, text): _value(v, device, text) for k, v in zip(node.keys, node.values)}
    return _literal(node, text)


def _tensor(node: ast.Call, device: str, text: str) -> torch.Tensor:
    name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
    if name not in MAKERS:
        raise OparaUsageError(f"--inputs {text!r}: unknown tensor maker {name!r}; use one of {', '.join(MAKERS)}")
    args = [_literal(a, text) for a in node.args]
    kwargs = {k.arg: _dtype(k.value, text) if k.arg == "dtype" else _literal(k.value, text) for k in node.keywords}
    if "device" in kwargs:
        raise OparaUsageError(f"--inputs {text!r}: leave device= out (the tensors go to --device)")
    try:
        return MAKERS[name](*args, **kwargs, device=device)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise OparaUsageError(f"--inputs: {ast.unparse(node)} failed ({one_line(exc)})") from None


def _dtype(node: ast.expr, text: str) -> torch.dtype:
    name = ast.unparse(node).removeprefix("torch.").strip("'\"")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise OparaUsageError(f"--inputs {text!r}: unknown dtype {name!r} (e.g. float32, float16, int64, bool)")
    return dtype


def _literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise OparaUsageError(f"--inputs {text!r}: {ast.unparse(node)!r} is not a number, string, tuple or tensor "
                              f"maker ({', '.join(MAKERS)})") from None
