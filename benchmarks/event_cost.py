"""What a cross-stream dependency costs inside a CUDA graph on this GPU: the value of ``EVENT_COST_MS``
(``opara_nb/pipeline.py``) that planning merges cheap streams by.

Run on the GPU machine: ``PYTHONPATH=. python benchmarks/event_cost.py [--kernels 64] [--replays 2000] [--json F]``.

Three CUDA graphs of the same N tiny kernels (in-place adds on one float each, launch-bound), timed by replaying each
back to back and dividing GPU time (CUDA events) by the number of replays:

- ``chain``: all N kernels on one stream, one after another;
- ``hops``: the same chain, but kernel i runs on stream i % 2 after an event from kernel i-1: N-1 cross-stream
  dependencies on the critical path, so (hops - chain) / (N - 1) is the cost of one record + wait;
- ``forks``: kernel 0, then N-1 independent kernels each on its own side stream (8 streams, round robin) forked from
  and joined back to the main stream, against ``chain``: what a fan-out of tiny branches costs or gains.

The suggested ``OPARA_NB_EVENT_COST_MS`` is the per-hop cost, rounded up to 0.1 us.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from opara_nb.runtime.cudagraph import CudaGraphs


def _graph(build) -> torch.cuda.CUDAGraph:
    """``build``'s kernels in a CUDA graph, warmed up first on a side stream (opara_nb's own capture layer)."""
    layer = CudaGraphs()
    layer.warm_up(build, 2)
    graph, _, _, _ = layer.capture(build)
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def measure(kernels: int, replays: int) -> dict[str, float]:
    x = torch.zeros(kernels, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(8)]

    def chain() -> None:
        for _ in range(kernels):
            x[0:1].add_(1.0)

    def hops() -> None:
        caller = torch.cuda.current_stream()
        pair = [caller, streams[0]]
        previous = caller
        for i in range(kernels):
            stream = pair[i % 2]
            if stream is not previous:
                stream.wait_stream(previous)
            with torch.cuda.stream(stream):
                x[0:1].add_(1.0)
            previous = stream
        caller.wait_stream(previous)

    def forks() -> None:
        caller = torch.cuda.current_stream()
        x[0:1].add_(1.0)
        for s in streams:
            s.wait_stream(caller)
        for i in range(1, kernels):
            with torch.cuda.stream(streams[i % len(streams)]):
                x[i:i + 1].add_(1.0)
        for s in streams:
            caller.wait_stream(s)

    times = {name: _replay_ms(_graph(fn), replays) for name, fn in
             (("chain", chain), ("hops", hops), ("forks", forks))}
    times["per_hop"] = (times["hops"] - times["chain"]) / (kernels - 1)
    times["per_kernel_in_chain"] = times["chain"] / kernels
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=64)
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("event_cost.py needs a CUDA GPU")
    times = measure(opts.kernels, opts.replays)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, {opts.kernels} kernels, {opts.replays} replays per graph")
    for name in ("chain", "hops", "forks"):
        print(f"  {name:6s} {times[name] * 1e3:9.2f} us per replay")
    print(f"  one kernel in a chain:      {times['per_kernel_in_chain'] * 1e3:.2f} us")
    print(f"  one cross-stream hop costs: {times['per_hop'] * 1e3:.2f} us more than a same-stream step")
    suggested = max(0.0, math.ceil(times["per_hop"] * 1e4) / 1e4)
    print(f"suggested: OPARA_NB_EVENT_COST_MS={suggested:g}  (opara_nb.pipeline.EVENT_COST_MS)")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "torch": torch.__version__, "kernels": opts.kernels,
                       "replays": opts.replays, "ms": times, "suggested_event_cost_ms": suggested}, fh, indent=1)


if __name__ == "__main__":
    main()
