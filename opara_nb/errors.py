"""Exceptions by audience: user mistakes say what to do; internal invariants name the bad value."""
from __future__ import annotations

__all__ = ["OparaUsageError", "CaptureError", "one_line"]


class OparaUsageError(ValueError):
    """The caller passed something opara_nb cannot use; the message says what to do instead."""


class CaptureError(RuntimeError):
    """A graph could not be captured on CUDA streams; callers fall back to eager and report this message."""


def one_line(exc: BaseException) -> str:
    """An exception as one short line (type and first line of its message), for notices and fallback reasons."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
