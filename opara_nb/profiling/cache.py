"""The per-user profile cache: one JSON file per (graph code, input signature, device, torch version, demand kind).

Directory: ``$OPARA_NB_CACHE_DIR``, else ``$XDG_CACHE_HOME/opara_nb``, else ``~/.cache/opara_nb``. Files are safe to
delete; a corrupt or unreadable one is ignored (and rewritten by the next profile).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "cache_key", "load", "save"]


def cache_dir() -> Path:
    """Where profiles are cached (not created until something is saved)."""
    explicit = os.environ.get("OPARA_NB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "opara_nb"


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype), list(value.stride()), value.device.type]
    return type(value).__name__


# Bump when what a profile measures or how it is stored changes: old cache files then stop matching.
PROFILE_FORMAT = 2


def cache_key(code: str, inputs: list, device_name: str, demand: str) -> str:
    """sha256 hex of everything a profile depends on, opara_nb's profile format included."""
    payload = json.dumps([PROFILE_FORMAT, code, [_signature(v) for v in inputs], device_name, torch.__version__,
                          demand])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load(key: str) -> dict | None:
    """The cached profile dict for ``key``, or None when absent or unreadable."""
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
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**data, "key": key}, fh)
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        return
