"""Exceptions by audience: user mistakes say what to do; internal invariants name the bad value."""
from __future__ import annotations

__all__ = ["OparaUsageError", "CaptureError"]


class OparaUsageError(ValueError):
    """The caller passed something opara_nb cannot use; the message says what to do instead."""


class CaptureError(RuntimeError):
    """A graph could not be captured on CUDA streams; callers fall back to eager and report this message."""
