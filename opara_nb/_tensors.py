"""Tensors inside nested outputs (tuples, lists, dicts, Hugging Face ModelOutput): map, list, compare."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["map_tensors", "tensor_leaves", "max_abs_diff"]


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and mappings (Hugging Face ModelOutput included)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in obj.items()}
        try:
            return type(obj)(**mapped)
        except TypeError:  # a mapping type that cannot be rebuilt from keywords: a plain dict keeps the values
            return mapped
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(fn, v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and mappings, in a stable order."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, obj)
    return found


def max_abs_diff(reference: Any, out: Any) -> float:
    """Largest elementwise difference over the floating-point tensors of two outputs; ``inf`` when their structure
    or shapes differ (they cannot be the same result)."""
    ref, got = tensor_leaves(reference), tensor_leaves(out)
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        return float("inf")
    diffs = [(r.double() - g.double().to(r.device)).abs().max().item() for r, g in zip(ref, got)
             if r.numel() and (r.is_floating_point() or g.is_floating_point())]
    return max(diffs, default=0.0)
