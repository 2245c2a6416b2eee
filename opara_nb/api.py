"""The public entry points: optimize, plan, profile, benchmark. Thin: each delegates to its layer."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from .errors import ModelError, OparaUsageError, user_traceback

if TYPE_CHECKING:
    from .bench import BenchResult
    from .pipeline import ModelPlan
    from .profiling import ModelProfile
    from .runtime import OparaModule

__all__ = ["optimize", "plan", "profile", "benchmark"]


def optimize(model: Callable, *args: Any, strategy: str = "auto", order: str = "", clone_outputs: bool | None = None,
             fuse: bool = False, max_memory_mb: float | None = None, plan: str | os.PathLike | None = None,
             **kwargs: Any) -> "OparaModule":
    """Capture ``model`` on example inputs, schedule its operators on CUDA streams and return an ``OparaModule``.

    ``strategy``: "auto" (measure candidate plans and the plain CUDA graph, keep the fastest) or a stream strategy;
    ``order``: a launch order for every candidate (default: each strategy's own); ``clone_outputs``: None copies an
    output only if you still hold it when the next call would overwrite it, True always, False never (see
    docs/trust.md); ``fuse``: add TorchInductor-fused candidates; ``max_memory_mb``: keep only plans whose graph memory
    fits. ``kwargs`` are the model's keyword inputs (one named like an option here goes in ``model_kwargs={...}``).
    ``plan``: a plan file written by ``om.save_plan(path)`` (or ``python -m opara_nb tune``): its plans run as they
    are, with no profiling and no candidate timing; it fixes strategy and order, and a file that does not fit the
    model or the inputs raises ``PlanFileError``.

    >>> om = opara_nb.optimize(model, x)          # doctest: +SKIP
    >>> om(x)                                      # same result as model(x), replayed from one CUDA graph
    >>> om.save_plan("model.plan.json")
    >>> om = opara_nb.optimize(model, x, plan="model.plan.json")    # elsewhere: no profiling, no timing
    """
    from .runtime import optimize as _optimize

    return _optimize(model, *args, strategy=strategy, order=order, clone_outputs=clone_outputs, fuse=fuse,
                     max_memory_mb=max_memory_mb, plan=plan, **kwargs)


def plan(model: Callable, *args: Any, strategy: str = "opara", order: str = "",
         model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> "ModelPlan":
    """Capture, profile and schedule ``model`` without running it on streams (works on CPU). ``kwargs`` and
    ``model_kwargs`` are the model's keyword inputs (the latter for names like ``strategy`` or ``order``)."""
    from .pipeline import plan_model

    try:
        return plan_model(model, *args, strategy=strategy, order=order, model_kwargs=model_kwargs, **kwargs)
    except ModelError as exc:  # the model's own error, from the user's line (as optimize shows it)
        raise exc.error.with_traceback(user_traceback(exc.error.__traceback__)) from None


def profile(model: Callable, *args: Any, cache: bool = True, model_kwargs: dict[str, Any] | None = None,
            **kwargs: Any) -> "ModelProfile":
    """Per-operator profile of ``model`` on the example inputs: kernels, time, resources, compute/memory class.

    Profiles are cached per user; ``cache=False`` measures again and replaces the cached one (``cache`` is not
    passed to the model: a model keyword named so goes in ``model_kwargs={...}``)."""
    from .profiling import profile_model

    if not isinstance(cache, bool):
        raise OparaUsageError(f"cache is True or False, got {cache!r}")
    try:
        return profile_model(model, *args, cache=cache, model_kwargs=model_kwargs, **kwargs)
    except ModelError as exc:
        raise exc.error.with_traceback(user_traceback(exc.error.__traceback__)) from None


def benchmark(model: Callable, *args: Any, modes: Any = None, **kwargs: Any) -> "BenchResult":
    """Measure eager, sequential CUDA graph and opara_nb strategies side by side on the same inputs."""
    from .bench import benchmark as _benchmark

    return _benchmark(model, *args, modes=modes, **kwargs)
