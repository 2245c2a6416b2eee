"""Where a decoder's per-call cost over a plain CUDA graph goes: its output holds a KV cache (an object pytree does not
open), which OparaModule hands out as a new copy per call (as eager builds a new one), while a plain graph hands out
its own cache object every call.

    PYTHONPATH=. python benchmarks/output_copy_probe.py [--layers 2,12] [--md FILE]

Per model: synchronous latency of the plain graph and of OparaModule (interleaved), the same module with the cache's
tensors handed out without a copy (what output protection could save), host time per call with the GPU busy, and a
torch.profiler table of one call's CUDA kernels and CPU operators."""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import opara_nb
from opara_nb.bench.modes import PlainCudaGraph


def _sync_us(calls: dict, iters: int = 200, rounds: int = 8) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            for _ in range(iters // rounds):
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                samples[k].append((time.perf_counter() - start) * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def _host_us(call, iters: int = 50) -> float:
    torch.cuda._sleep(100_000_000)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    us = (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    return us


def probe(layers: int) -> list[str]:
    import transformers

    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=layers)).eval().cuda()
    ids = torch.randint(0, 30000, (1, 128), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PlainCudaGraph(model, (ids,), {})
        om = opara_nb.optimize(model, ids, strategy="sequential")
        om(ids)
        bare = opara_nb.optimize(model, ids, strategy="sequential")
        bare(ids)
    opaque = bare._last.graphed._opaque
    if opaque is not None:  # hand out the graph's own cache tensors (unsafe: only to see what the copies cost)
        import opara_nb.runtime.objects as objects
        real = objects.copy_tensors
        objects.copy_tensors = lambda ts: {id(t): t for t in ts} if ts is opaque._tensors else real(ts)
    calls = {"plain graph": lambda: plain(ids), "OparaModule": lambda: om(ids),
             "OparaModule, cache tensors not copied": lambda: bare(ids)}
    sync = _sync_us(calls)
    rows = [f"| gpt2 ({layers} layers) | {k} | {sync[k]:.1f} | {_host_us(c):.1f} |" for k, c in calls.items()]
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        om(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            om(ids)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    plain.release(), om.release(), bare.release()
    return rows + ["", f"profile of 5 OparaModule calls, gpt2 ({layers} layers), by CUDA time:", "```", table, "```",
                   "by CPU time:", "```", cpu, "```", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,12")
    parser.add_argument("--md", default=None)
    ns = parser.parse_args()
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, command: PYTHONPATH=. python "
             f"benchmarks/output_copy_probe.py --layers {ns.layers}", "",
             "| model | call | sync latency us (median) | host us per call (GPU busy) |", "|---|---|---|---|"]
    tables: list[str] = []
    for n in ns.layers.split(","):
        rows = probe(int(n))
        lines += [r for r in rows if r.startswith("| gpt2")]
        tables += [r for r in rows if not r.startswith("| gpt2")]
    text = "\n".join(lines + [""] + tables)
    print(text)
    if ns.md:
        with open(ns.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
