"""Speed and graph memory against the number of physical streams: does a plan on fewer streams keep the speed and
shed the memory? (Issue 13: the kept plan's graph memory is 3.2x the plain graph's on NASNet-A Large and 16x on
DeepFM, because each stream allocates from blocks of its own.) Run on the GPU machine from the checkout root:

    PYTHONPATH=. python benchmarks/streams_memory.py [--models googlenet,deepfm] [--streams 1,2,4,8,16] [--md FILE]

Per model: the plain CUDA graph of the model (the reference the report uses), then ``strategy="opara"`` with each
``max_streams``. Columns: synchronous median ms (call, then synchronize: ``runtime.timing.sync_latency_ms``), the
speed-up over the plain graph, and the MiB the captured graph's private pool took (``GraphedCall.pool_mb``) with its
ratio to the plain graph's. Each module is released before the next is made, so pools do not stack.
"""
from __future__ import annotations

import argparse
import warnings

import torch

import opara_nb
from benchmarks._table import emit
from opara_nb import models
from opara_nb.bench.modes import PlainCudaGraph
from opara_nb.runtime import timing


def _sync_ms(call) -> float:
    """Median ms of call + synchronize, as ``auto`` times its candidates."""
    return timing.sync_latency_ms({"call": call}, torch.cuda.synchronize)["call"]


def _measure(model, args, kwargs, **options) -> tuple[float, float, int]:
    """(sync ms, graph pool MiB, physical streams) of one optimized module, released afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = opara_nb.optimize(model, *args, **options, **kwargs)
        with torch.no_grad():
            ms = _sync_ms(lambda: om(*args, **kwargs))
    graphed = om._last.graphed if om._last is not None else None
    pool = graphed.pool_mb if graphed is not None else float("nan")
    streams = max((ex.mapping.num_physical for ex in om.executors), default=1)
    om.release()
    return ms, pool, streams


def _plain(model, args, kwargs) -> tuple[float, float]:
    """(sync ms, graph pool MiB) of the plain CUDA graph: timed as a hand-written graph (``PlainCudaGraph``), its pool
    from ``auto``'s measurement of the same graph (``auto`` with one candidate also captures the plain graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = opara_nb.optimize(model, *args, candidates=("sequential",), **kwargs)
    pool = om.report.graph_memory_mb.get("cudagraph", float("nan"))
    om.release()
    plain = PlainCudaGraph(model, args, kwargs)
    ms = _sync_ms(lambda: plain(*args, **kwargs))
    plain.release()
    return ms, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="googlenet,inception_v3,deepfm,nasnet")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--md", default=None)
    ns = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, fp32; command: PYTHONPATH=. "
             f"python benchmarks/streams_memory.py --models {ns.models} --streams {ns.streams}", "",
             "| model | plan | physical streams | sync ms | vs plain graph | graph pool MiB | pool vs plain |",
             "|---|---|---|---|---|---|---|"]
    for name in ns.models.split(","):
        if name not in models.available():
            lines.append(f"| {name} | not available here | | | | | |")
            continue
        model, args, kwargs = models.get(name, device="cuda")
        plain_ms, plain_pool = _plain(model, args, kwargs)
        lines.append(f"| {name} | plain CUDA graph | 1 | {plain_ms:.3f} | 1.00x | {plain_pool:.0f} | 1.0x |")
        for k in (int(v) for v in ns.streams.split(",")):
            ms, pool, streams = _measure(model, args, kwargs, strategy="opara", max_streams=k)
            lines.append(f"| {name} | opara, max_streams={k} | {streams} | {ms:.3f} | {plain_ms / ms:.2f}x | "
                         f"{pool:.0f} | {pool / max(plain_pool, 1.0):.1f}x |")
        print("\n".join(lines[-len(ns.streams.split(",")) - 1:]), flush=True)
    emit(lines, ns.md)


if __name__ == "__main__":
    main()
