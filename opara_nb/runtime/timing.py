"""How ``strategy="auto"`` measures its captured candidates: synchronous latency (what it picks by) and replay time.

Users call a model synchronously, so "auto" ranks candidates by the host wall time of ``replay(); synchronize()``;
back-to-back replay time (GPU throughput, CUDA events) is reported next to it. Candidates are interleaved round by
round so drift is shared. ``_clock`` and ``_device_sync`` are module attributes so CPU tests can fake them.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cudagraph import GraphedCall

__all__ = ["sync_latency_ms", "replay_ms"]

# "auto" picks by synchronous latency (what a caller waits for), interleaving candidates round by round so drift
# is shared; back-to-back replay time (GPU throughput) is reported next to it.
_SYNC_ROUNDS, _SYNC_CALLS = 5, 20
_REPLAY_ROUNDS, _REPLAY_CALLS = 3, 20
_clock = time.perf_counter  # module attributes so CPU tests can fake the clock and the device sync


def _device_sync() -> None:
    torch.cuda.synchronize()


def sync_latency_ms(captured: dict[str, GraphedCall]) -> dict[str, float]:
    """Median host wall time of ``replay(); synchronize()`` per candidate: the latency of a synchronous call.

    A plan whose replay is fast back to back can still be slow to call one at a time (launch and event overheads
    that overlap only when replays queue up), so this, not throughput, decides.
    """
    samples: dict[str, list[float]] = {k: [] for k in captured}
    for _ in range(_SYNC_ROUNDS):
        for k, gc_ in captured.items():
            gc_.replay_only()  # the first replay after another candidate's pays for its caches: not a sample
            _device_sync()
            for _ in range(_SYNC_CALLS):
                start = _clock()
                gc_.replay_only()
                _device_sync()
                samples[k].append((_clock() - start) * 1e3)
    return {k: _median(v) for k, v in samples.items()}


def replay_ms(captured: dict[str, GraphedCall]) -> dict[str, float]:
    """Median GPU time per replay, replays queued back to back (CUDA events): the graph's throughput."""
    samples: dict[str, list[float]] = {k: [] for k in captured}
    for _ in range(_REPLAY_ROUNDS):
        for k, gc_ in captured.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            gc_.replay_only()
            start.record()
            for _ in range(_REPLAY_CALLS):
                gc_.replay_only()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end) / _REPLAY_CALLS)
    return {k: _median(v) for k, v in samples.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
