"""The per-user profile cache: one JSON file per profile, keyed on everything that changes the numbers.

The key covers the graph's code, the input signature (shapes, dtypes, strides, devices), the device (name and compute
capability), the torch, CUDA and cuDNN versions, opara_nb's profile format, the demand kind, and the weights' identity
(a fingerprint of each parameter's shape and a sample of its values): a rebuilt model with new weights is profiled
again, the same model reused across ``profile``, ``optimize`` and ``benchmark`` is profiled once.

Directory: ``$OPARA_NB_CACHE_DIR``, else ``$XDG_CACHE_HOME/opara_nb``, else ``~/.cache/opara_nb``. Files are safe to
delete; a corrupt or unreadable one is ignored (and rewritten by the next profile).

Measuring again: ``with refreshing(): ...`` (``%%opara --reprofile``, ``opara_nb.profile(..., cache=False)``) or
``OPARA_NB_CACHE=refresh`` measures and overwrites; ``OPARA_NB_CACHE=off`` neither reads nor writes.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["cache_dir", "cache_key", "load", "save", "refreshing", "environment_key"]

_REFRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("opara_nb_cache_refresh", default=False)


def cache_dir() -> Path:
    """Where profiles are cached (not created until something is saved)."""
    explicit = os.environ.get("OPARA_NB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "opara_nb"


@contextlib.contextmanager
def refreshing() -> Iterator[None]:
    """Profiles made inside this block are measured again (never read from the cache) and replace the cached ones."""
    token = _REFRESH.set(True)
    try:
        yield
    finally:
        _REFRESH.reset(token)


def _setting() -> str:
    return os.environ.get("OPARA_NB_CACHE", "on").strip().lower()


def _reads() -> bool:
    return not _REFRESH.get() and _setting() not in ("refresh", "off", "0", "false", "no")


def _writes() -> bool:
    return _setting() not in ("off", "0", "false", "no")


def _is_weight(t: torch.Tensor) -> bool:
    # dynamo passes parameters to the graph as inputs; these flags mark them (see runtime.runners.is_parameter).
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_is_param", False)


def _fingerprint(t: torch.Tensor, samples: int = 16) -> list[float]:
    """A few values spread over the tensor: tells rebuilt weights apart without hashing megabytes."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return []
    step = max(1, flat.numel() // samples)
    picked = flat[::step][:samples]
    if picked.is_complex():
        picked = torch.view_as_real(picked).reshape(-1)
    return [float(v) for v in picked.double().cpu().tolist()]


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        sig = [list(value.shape), str(value.dtype), list(value.stride()), value.device.type]
        return sig + [_fingerprint(value)] if _is_weight(value) else sig
    return type(value).__name__


def environment_key(device_name: str) -> list[Any]:
    """What the machine contributes to a profile: device, its compute capability, torch / CUDA / cuDNN versions."""
    capability = None
    if torch.cuda.is_available() and device_name != "cpu":
        capability = list(torch.cuda.get_device_capability())
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [device_name, capability, torch.__version__, torch.version.cuda, cudnn]


# Bump when what a profile measures or how it is stored changes: old cache files then stop matching.
PROFILE_FORMAT = 3


def cache_key(code: str, inputs: list, device_name: str, demand: str) -> str:
    """sha256 hex of everything a profile depends on, opara_nb's profile format included."""
    payload = json.dumps([PROFILE_FORMAT, code, [_signature(v) for v in inputs], environment_key(device_name),
                          demand])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load(key: str) -> dict | None:
    """The cached profile dict for ``key``, or None when absent, unreadable, or reading is off (see module doc)."""
    if not _reads():
        return None
    path = cache_dir() / f"{key}.json"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def save(key: str, data: dict) -> None:
    """Write atomically so a concurrent reader never sees half a file; an unwritable cache is skipped silently
    because the profile itself is still valid."""
    if not _writes():
        return
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**data, "key": key}, fh)
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        return
