"""Capture a model through a dynamo backend: one fx graph per dynamo graph, graph breaks included.

``compile_with_backend`` hides the call behind a trampoline with a fresh code object, so dynamo's per-code cache
and recompile limit never mix one capture with another or with the user's own ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import types
from typing import Any, Callable, Iterator

import torch

from ..errors import ModelError, OparaUsageError
from .graph import CapturedGraph
from .sandbox import Sandbox, clone_inputs, model_error

__all__ = ["compile_with_backend", "capture_graphs", "check_inputs", "quiet_tracing_logs", "crowds_user_compile",
           "model_keywords"]

_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")

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


# The model's own code (forward, and the resume functions after a graph break) is shared with the user's
# torch.compile of the same model: where torch can (2.13+), our compiled entries live in a region of their own, so
# they never count against the user's recompile limit.
_ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def crowds_user_compile(model: Any) -> bool:
    """Whether our compiles have filled the recompile limit of ``model``'s own ``forward`` (before torch 2.13, and
    only after graph breaks: then dynamo runs ``forward`` as a frame of its own), so that the user's own
    ``torch.compile`` of it would run eagerly."""
    import torch._dynamo.config as config

    code = getattr(getattr(type(model), "forward", None), "__code__", None)
    entries = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if _ISOLATED or code is None or entries is None:
        return False
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8))
    return len(entries(code)) >= limit


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

    compiled = torch.compile(_fresh_trampoline(), backend=backend, dynamic=False, fullgraph=False, **_ISOLATED)
    # One patch object, entered on every call: each new one would leave a ContextVar behind (~200 bytes a call).
    patch = torch._dynamo.config.patch(**_limit_patch())

    def run(*args: Any, **kwargs: Any) -> Any:
        with patch, quiet_tracing_logs():
            return compiled(model, args, kwargs)

    run.__wrapped__ = model  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def quiet_tracing_logs() -> Iterator[None]:
    """Silence the error log lines fake-tensor tracing prints before dynamo raises: the model's own error is what
    the user should see (opara_nb reports it once, see errors.ModelError)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


def model_keywords(given: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword inputs: ``model_kwargs`` and the other keywords, a name in both refused."""
    if given is None:
        return kwargs
    if not isinstance(given, dict) or not all(isinstance(k, str) for k in given):
        raise OparaUsageError(f"model_kwargs is a dict of the model's keyword inputs by name, got {given!r}")
    both = sorted(set(given) & set(kwargs))
    if both:
        raise OparaUsageError(f"model keyword {both[0]!r} given twice: in model_kwargs and as a keyword")
    return {**kwargs, **given}


def capture_graphs(model: Callable, args: tuple | list = (), kwargs: dict | None = None) -> list[CapturedGraph]:
    """Run ``model(*args, **kwargs)`` once under ``torch.no_grad()`` and return every dynamo graph, in order.

    A graph break gives several graphs; all of them are kept.
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    check_inputs(model, args, kwargs)
    args, kwargs = clone_inputs(args, kwargs)  # the graphs' example inputs: profiling runs on them, not the user's
    recorded: list[tuple[torch.fx.GraphModule, list]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        recorded.append((gm, list(example_inputs)))
        return gm.forward

    try:
        with Sandbox(model), torch.no_grad():
            compile_with_backend(model, record)(*args, **kwargs)
    except Exception:
        own = model_error(model, args, kwargs)
        if own is not None:
            raise ModelError(own) from None
        raise
    return [CapturedGraph.from_gm(gm, ex, i) for i, (gm, ex) in enumerate(recorded)]
