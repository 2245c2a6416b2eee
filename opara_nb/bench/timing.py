"""Latency measurement for the benchmark harness: synchronous host latency and GPU-side latency, with summaries.

Two numbers per mode, because they answer different questions:

* synchronous: what a user sees -- host time of one call (input copy included) followed by a device synchronize;
* GPU-side: the device time of the call with the host's enqueue cost hidden -- before each call the GPU is kept busy
  with ``torch.cuda._sleep`` long enough for the host to enqueue the whole call, and CUDA events recorded right before
  and after the call on the current stream measure only the work of the call.

Without CUDA only the synchronous latency exists (``time.perf_counter``); GPU-side results are ``None``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Stats", "summarize", "time_sync", "time_gpu", "cuda_ready", "host_median_ms"]

Call = Callable[[], object]


@dataclass(frozen=True)
class Stats:
    """Median and 90th percentile of a list of samples, in milliseconds."""

    median_ms: float
    p90_ms: float
    samples: int


def summarize(samples_ms: list[float]) -> Stats:
    """Median and p90 (nearest-rank) of ``samples_ms``; raises ValueError on an empty list."""
    if not samples_ms:
        raise ValueError("summarize() got no samples: iters must be >= 1")
    ordered = sorted(samples_ms)
    rank = max(0, min(len(ordered) - 1, int(round(0.9 * len(ordered))) - 1))
    return Stats(statistics.median(ordered), ordered[rank], len(ordered))


def host_median_ms(fn: Call, repeat: int) -> float:
    """Median host wall time of ``fn()`` over ``repeat`` runs, in ms: for pure CPU work such as planning."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cuda_ready() -> bool:
    """True when CUDA can be used in this process."""
    return torch.cuda.is_available()


def time_sync(call: Call, iters: int, warmup: int, cuda: bool) -> Stats:
    """Host time of ``call()`` plus a device synchronize, ``iters`` times after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        call()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def _sleep_kernel() -> Callable[[int], None] | None:
    # torch.cuda._sleep is private but has existed unchanged for many releases; guard rather than version-check.
    return getattr(torch.cuda, "_sleep", None)


def _cycles_per_ms(sleep: Callable[[int], None]) -> float:
    """How many ``_sleep`` cycles the GPU spins per millisecond (clock rates differ and boost)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep(1_000_000)  # wake the clocks up before measuring
    cycles = 20_000_000
    start.record()
    sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def _host_enqueue_ms(call: Call, sleep: Callable[[int], None], cycles_per_ms: float) -> float:
    """Host time to enqueue one call while the GPU is busy (so the call cannot wait on the device)."""
    worst = 0.0
    for _ in range(3):
        sleep(int(cycles_per_ms * 200))
        start = time.perf_counter()
        call()
        worst = max(worst, (time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return worst


def time_gpu(call: Call, iters: int, warmup: int) -> Stats | None:
    """GPU-side latency of ``call()`` with the host enqueue hidden; ``None`` when the sleep kernel is unavailable."""
    sleep = _sleep_kernel()
    if sleep is None or not torch.cuda.is_available():
        return None
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    per_ms = _cycles_per_ms(sleep)
    # twice the enqueue time plus a margin: the GPU must still be sleeping when the host finishes enqueueing.
    sleep_cycles = int(per_ms * (2.0 * _host_enqueue_ms(call, sleep, per_ms) + 0.2))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        sleep(sleep_cycles)
        start.record()
        call()
        end.record()
        # one call in flight at a time, so the next sleep starts on an idle GPU and hides the next enqueue
        end.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])
