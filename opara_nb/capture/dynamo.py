"""Capture a model through a dynamo backend: one fx graph per dynamo graph, graph breaks included.

``compile_with_backend`` hides the call behind a trampoline with a fresh code object, so dynamo's per-code cache
and recompile limit never mix one capture with another or with the user's own ``torch.compile``.
"""
from __future__ import annotations

import itertools
import types
from typing import Any, Callable

import torch

from ..errors import OparaUsageError
from .graph import CapturedGraph

__all__ = ["compile_with_backend", "capture_graphs", "check_inputs"]

_counter = itertools.count()
_ALLOWED_LEAVES = (int, float, bool, complex, str, type(None), torch.dtype, torch.device)
# Resume functions after a graph break are shared per model code object: without headroom repeated captures of
# the same model (profile, then optimize, then benchmark) would hit dynamo's recompile limit and run eagerly.
_LIMIT_HEADROOM = 1024


def _trampoline(model: Callable, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def _fresh_trampoline() -> Callable:
    name = f"opara_capture_{next(_counter)}"
    code = _trampoline.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    # Own globals: dynamo installs its compiled wrappers (__compiled_fn_N) in the frame's globals; with the module's
    # globals they would accumulate there for the life of the process.
    return types.FunctionType(code, {"__builtins__": __builtins__}, name)


def _limit_patch() -> dict[str, int]:
    import torch._dynamo.config as config

    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    return {n: max(getattr(config, n), _LIMIT_HEADROOM) for n in names if hasattr(config, n)}


def compile_with_backend(model: Callable, backend: Callable) -> Callable:
    """A ``torch.compile``'d callable ``fn(*args, **kwargs)`` that runs ``model`` through ``backend``.

    Every call of this function compiles a new trampoline code object, so its dynamo cache starts empty.

    >>> fn = compile_with_backend(model, lambda gm, ex: gm.forward)   # doctest: +SKIP
    >>> fn(x)                                                          # same as model(x)
    """
    import torch._dynamo

    compiled = torch.compile(_fresh_trampoline(), backend=backend, dynamic=False, fullgraph=False)
    patch = _limit_patch()

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(**patch):
            return compiled(model, args, kwargs)

    run.__wrapped__ = model  # type: ignore[attr-defined]
    return run


def _check_leaves(value: Any, path: str) -> int:
    """Count tensors in a nested input; raise on a leaf dynamo cannot take as an example input."""
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(_check_leaves(v, f"{path}[{k!r}]") for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sum(_check_leaves(v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, _ALLOWED_LEAVES):
        return 0
    raise OparaUsageError(
        f"example input {path} is a {type(value).__name__}; pass tensors, numbers, bools, strings, None "
        "or tuples/lists/dicts of them (convert it to a tensor, or bind it with functools.partial)")


def check_inputs(model: Any, args: tuple, kwargs: dict) -> None:
    """Raise ``OparaUsageError`` for inputs opara_nb cannot capture, saying what to pass instead."""
    if not callable(model):
        raise OparaUsageError(f"model must be a torch.nn.Module or a function, got a {type(model).__name__}")
    if isinstance(model, torch.nn.Module) and model.training:
        raise OparaUsageError("the model is in training mode; opara_nb optimizes inference: call model.eval() first")
    tensors = _check_leaves(tuple(args), "args") + _check_leaves(dict(kwargs), "kwargs")
    if tensors == 0:
        raise OparaUsageError(
            "no tensor among the example inputs; pass the tensors the model takes, e.g. "
            "opara_nb.optimize(model, torch.randn(1, 3, 224, 224)) or input_ids=... as a keyword")


def capture_graphs(model: Callable, args: tuple | list = (), kwargs: dict | None = None) -> list[CapturedGraph]:
    """Run ``model(*args, **kwargs)`` once under ``torch.no_grad()`` and return every dynamo graph, in order.

    A graph break gives several graphs; all of them are kept.
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    check_inputs(model, args, kwargs)
    recorded: list[tuple[torch.fx.GraphModule, list]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        recorded.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        compile_with_backend(model, record)(*args, **kwargs)
    return [CapturedGraph.from_gm(gm, ex, i) for i, (gm, ex) in enumerate(recorded)]
