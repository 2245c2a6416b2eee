"""How ``strategy="auto"`` measures its captured candidates: synchronous latency through the call path users get
(what it picks by), back-to-back replay time (reported next to it), and the original model's eager latency.

Users call a model synchronously, so "auto" ranks candidates by the host wall time of ``call(); synchronize()``,
where ``call`` is the very replay path of ``OparaModule`` (input copy, guards excepted, output handling). Candidates
are interleaved round by round so drift is shared. ``_clock`` is a module attribute so CPU tests can fake it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["sync_latency_ms", "replay_ms"]

_SYNC_ROUNDS, _SYNC_CALLS = 5, 20
_REPLAY_ROUNDS, _REPLAY_CALLS = 3, 20
_clock = time.perf_counter


def sync_latency_ms(calls: dict[str, Callable[[], Any]], sync: Callable[[], None],
                    rounds: int = _SYNC_ROUNDS, per_round: int = _SYNC_CALLS) -> dict[str, float]:
    """Median host wall time of ``call(); sync()`` per candidate, in ms.

    A plan whose replay is fast back to back can still be slow to call one at a time (launch and event overheads
    that overlap only when replays queue up), so this, not throughput, decides.
    """
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            call()  # the first call after another candidate's pays for its caches: not a sample
            sync()
            for _ in range(per_round):
                start = _clock()
                call()
                sync()
                samples[k].append((_clock() - start) * 1e3)
    return {k: _median(v) for k, v in samples.items()}


def replay_ms(graphs: dict[str, Any]) -> dict[str, float]:
    """Median GPU time per replay of each captured graph (``.replay_only()``), replays queued back to back."""
    import torch

    samples: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(_REPLAY_ROUNDS):
        for k, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay_only()
            start.record()
            for _ in range(_REPLAY_CALLS):
                g.replay_only()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end) / _REPLAY_CALLS)
    return {k: _median(v) for k, v in samples.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
