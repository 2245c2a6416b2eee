"""Models to try opara_nb on: small bundled ones (always available) and the paper's six (when installed).

``get(name, batch=1, device="cpu", seed=0)`` returns ``(model, args, kwargs)`` ready for ``opara_nb.optimize(model,
*args, **kwargs)``. Models are in eval mode with random weights drawn from ``seed`` (the same name, batch and seed give
the same weights and inputs); nothing is ever downloaded. No CUDA work happens at import.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import OparaUsageError
from .bundled import DeepFM, GraphBreakNet, InceptionNet, TinyTransformer
from .zoo import PAPER_MODELS

__all__ = ["get", "names", "available", "DeepFM", "GraphBreakNet", "InceptionNet", "TinyTransformer"]

Example = tuple[torch.nn.Module, tuple, dict]


def _inception_block(batch: int) -> Example:
    return InceptionNet(), (torch.randn(batch, 3, 64, 64),), {}


def _tiny_transformer(batch: int) -> Example:
    model = TinyTransformer()
    x = torch.randn(batch, 16, model.dim)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    return model, (x,), {"mask": mask}


def _graph_break(batch: int) -> Example:
    return GraphBreakNet(), (torch.randn(batch, 3, 32, 32),), {}


def _deepfm(batch: int) -> Example:
    model = DeepFM()
    sparse = torch.randint(0, model.vocab_size, (batch, model.num_sparse))
    dense = torch.randn(batch, model.num_dense)
    return model, (sparse, dense), {}


_BUNDLED: dict[str, Callable[[int], Example]] = {
    "inception_block": _inception_block,
    "tiny_transformer": _tiny_transformer,
    "graph_break": _graph_break,
    "deepfm": _deepfm,
}


def names() -> list[str]:
    """All model names ``get`` knows, bundled first."""
    return list(_BUNDLED) + list(PAPER_MODELS)


def available() -> list[str]:
    """The model names whose libraries are installed here."""
    return list(_BUNDLED) + [n for n, spec in PAPER_MODELS.items() if spec.installed()]


def get(name: str, batch: int = 1, device: str | torch.device = "cpu", seed: int | None = 0) -> Example:
    """Build model ``name`` in eval mode with random weights, plus example inputs of batch size ``batch``.

    ``seed`` seeds torch's CPU generator for the build (the caller's RNG state is restored afterwards); ``None`` leaves
    the global RNG alone. A paper model whose library is missing raises OparaUsageError naming the pip package.

    >>> model, args, kwargs = get("deepfm", batch=4)
    >>> tuple(model(*args, **kwargs).shape)
    (4, 1)
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise OparaUsageError(f"batch must be a positive int, got {batch!r}")
    if name not in _BUNDLED and name not in PAPER_MODELS:
        raise OparaUsageError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    build = _BUNDLED[name] if name in _BUNDLED else PAPER_MODELS[name].build_checked
    # built on the CPU generator so that the same seed gives the same model on every device
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model, args, kwargs = build(batch)
    return _to(model.eval(), args, kwargs, device)


def _to(model: torch.nn.Module, args: tuple, kwargs: dict, device: Any) -> Example:
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return model.to(device), tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
