"""Per-call host overhead of OparaModule over a raw ``torch.cuda.CUDAGraph`` replay of the same model, with the guard
work timed on its own. Run on the GPU machine from the checkout root:

    PYTHONPATH=. python benchmarks/call_overhead.py [--md FILE]

For each model: a raw replay (``bench.modes.PlainCudaGraph``: copy the inputs into static buffers, replay, return the
static outputs), and OparaModule with ``strategy="sequential"`` (one stream: the same kernels, so the difference is the
call path) and with the default ``auto``. Host time per call is measured while the GPU is kept busy
(``torch.cuda._sleep``), so it is the time to enqueue the call and never includes waiting for the device; the
synchronous latency (call, then synchronize) is reported too. The guard rows time the hot path's one generated check
(``guards.hot_guard``), the slow path's call key, and the global-state and model checks in their separate forms.

    PYTHONPATH=. python benchmarks/call_overhead.py --python-path [--md FILE]

runs anywhere (no GPU): the same modules on ``testing.FakeGraphs`` with a replay that does nothing, so the time per
call is the Python call path alone, against a raw "copy the inputs, replay" loop over the same static buffers.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from opara_nb import models
from benchmarks._table import emit
from opara_nb.bench.modes import PlainCudaGraph
from opara_nb.runtime import OparaModule, call_key


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Nested(nn.Module):
    """Nested inputs with a non-tensor leaf: a dict of tensors, a tuple, a float and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.gate = nn.Linear(64, 64)

    def forward(self, batch, pair, scale=1.0, use_gate=True):
        x = self.proj(batch["x"]) * batch["mask"]
        y = pair[0] + pair[1]
        out = x + y * scale
        return {"out": self.gate(out) if use_gate else out, "aux": (x, y)}


def _cases(dev: str = "cuda") -> list[tuple[str, nn.Module, tuple, dict]]:
    cases = [("tiny (2 linears, batch 1)", Tiny().eval().to(dev), (torch.randn(1, 64, device=dev),), {})]
    x = torch.randn(4, 64, device=dev)
    cases.append(("nested inputs (dict, tuple, float, bool)", Nested().eval().to(dev),
                  ({"x": x, "mask": torch.ones_like(x)}, (x.clone(), x.clone())), {"scale": 0.5, "use_gate": True}))
    for name in ("googlenet", "deepfm"):
        if name in models.available():
            model, args, kwargs = models.get(name, device=dev)
            cases.append((name, model, args, kwargs))
    return cases


def _host_samples(calls: dict[str, Callable[[], Any]], rounds: int = 60, burst: int = 20) -> dict[str, list[float]]:
    """Host time per call, in bursts of ``burst`` calls queued behind a long GPU sleep (so no call waits for the
    device), variants interleaved round by round so that drift is shared: one sample per round and variant."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            torch.cuda._sleep(40_000_000)  # tens of ms of GPU work ahead of the burst
            start = time.perf_counter()
            for _ in range(burst):
                call()
            samples[k].append((time.perf_counter() - start) / burst * 1e6)
            torch.cuda.synchronize()
    return samples


def _host_us(calls: dict[str, Callable[[], Any]], rounds: int = 60, burst: int = 20) -> dict[str, float]:
    """The lower quartile of each variant's bursts, since host jitter only ever adds time (run 5's medians of 25
    bursts moved by +-4 us between identical paths)."""
    return {k: statistics.quantiles(v, n=4)[0] for k, v in _host_samples(calls, rounds, burst).items()}


def _paired_over(samples: dict[str, list[float]], path: str, raw: str) -> float:
    """The median over rounds of ``path`` minus ``raw`` timed in the same round: drift between rounds (this host's
    Python speed moves up to 2x between calls) cancels in each difference."""
    return statistics.median(a - b for a, b in zip(samples[path], samples[raw]))


def _sync_us(calls: dict[str, Callable[[], Any]], rounds: int = 10, per_round: int = 20) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(per_round):
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                samples[k].append((time.perf_counter() - start) * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def _python_us(call: Callable[[], Any], iters: int = 20000) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters * 1e6


def _raw_replay(om: OparaModule, args: tuple, kwargs: dict) -> Callable[[], Any]:
    """The module's own captured graph replayed by hand (copy the inputs, replay): what its call path adds is the
    difference."""
    graphed = om._last.graphed
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    pairs = [(graphed._static[i], leaves[i]) for i in graphed._slots]

    def replay() -> None:
        for dst, src in pairs:
            dst.copy_(src)
        graphed.graph.replay()

    return replay


def _called(model: nn.Module, args: tuple, kwargs: dict, **options: Any) -> OparaModule:
    """An OparaModule of ``model`` after its first call (planned and captured), its notices silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = OparaModule(model, **options)
        om(*args, **kwargs)
    return om


def measure(name: str, model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = PlainCudaGraph(model, args, kwargs)
    seq = _called(model, args, kwargs, strategy="sequential")
    bare = _called(model, args, kwargs, strategy="sequential", clone_outputs=False)  # no output protection: its cost
    auto = _called(model, args, kwargs)
    rows = []
    calls = {"raw CUDAGraph replay": lambda: raw(*args, **kwargs),
             "OparaModule sequential": lambda: seq(*args, **kwargs),
             "same graph as sequential, raw replay": _raw_replay(seq, args, kwargs),
             "OparaModule sequential, clone_outputs=False": lambda: bare(*args, **kwargs),
             "same graph as sequential clone_outputs=False, raw replay": _raw_replay(bare, args, kwargs),
             f"OparaModule auto (kept {auto.report.kept})": lambda: auto(*args, **kwargs),
             "same graph as auto, raw replay": _raw_replay(auto, args, kwargs)}
    for _ in range(50):
        for call in calls.values():
            call()
    samples = _host_samples(calls, rounds=120)
    host = {k: statistics.quantiles(v, n=4)[0] for k, v in samples.items()}
    sync = _sync_us(calls)
    for k in calls:
        base = "same graph as auto, raw replay" if "auto" in k else \
            "same graph as sequential clone_outputs=False, raw replay" if "False" in k else \
            "same graph as sequential, raw replay"
        over = "" if "raw" in k else f"{host[k] - host[base]:+.1f} | {_paired_over(samples, k, base):+.1f}"
        rows.append(f"| {name} | {k} | {host[k]:.1f} | {over or ' | '} | {sync[k]:.1f} |")
    for label, om in (("sequential", seq), ("auto", auto)):  # did a held output switch the module to copies?
        rows.append(f"| {name} | {label}: clone_outputs={om.clone_outputs}, notices={len(om.notices)} | | | |")
    entry = seq._last
    guards = {"the hot path's whole check (hot_guard: state, model, inputs)": lambda: entry.hot(args, kwargs),
              "call key (the slow path's)": lambda: call_key(args, kwargs),
              "global state alone (CallState.check)": entry.state.check,
              "model alone (ModelGuard.clean)": seq._guard.clean}
    for k, fn in guards.items():
        rows.append(f"| {name} | guard: {k} | {_python_us(fn):.2f} | | |")
    raw.release()
    bare.release()
    seq.release()
    auto.release()
    return rows


def guard_rows(name: str, model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The hot path's check alone on a larger model, with what its model part compares per call."""
    om = _called(model, args, kwargs, strategy="sequential")
    entry, guard = om._last, om._guard
    counts = guard.counts()
    watched = (f"{counts['training flags']} training flags compared, {counts['training flags counted on change']} "
               f"counted on change, {counts['attributes']} attributes")
    check_us = _python_us(lambda: entry.hot(args, kwargs))
    rows = [f"| {name} | guard: the hot path's whole check ({watched}) | {check_us:.2f} | | |",
            f"| {name} | guard: model alone (ModelGuard.clean) | {_python_us(guard.clean):.2f} | | |"]
    om.release()
    return rows


def python_path(name: str, model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The call path's Python alone: OparaModule on fake graphs whose replay does nothing, against a raw loop."""
    from opara_nb.testing import FakeGraphs

    om = _called(model, args, kwargs, strategy="sequential", graphs=FakeGraphs())
    graphed = om._last.graphed
    graphed.graph.replay = graphed._replay_graph = lambda: None
    graphed._make_fast()
    raw = _raw_replay(om, args, kwargs)
    calls = {"raw": raw, "om": lambda: om(*args, **kwargs), "check": lambda: om._last.hot(args, kwargs)}
    times = {k: float("inf") for k in calls}
    with torch.no_grad():
        for _ in range(40):  # interleaved short bursts, best of each: this VM's noise is bursty
            for k, f in calls.items():
                times[k] = min(times[k], _python_us(f, iters=2000))
    return [f"| {name} | {times['raw']:.2f} | {times['om']:.2f} | {times['om'] - times['raw']:+.2f} | "
            f"{times['check']:.2f} |"]


def _without(fast: Callable, *markers: str) -> Callable:
    """``fast`` generated again without the lines (and their indented bodies) that start with one of ``markers``."""
    kept, skip = [], False
    for line in fast.source.splitlines():
        body = line.strip()
        if skip and line.startswith("        "):
            continue
        skip = any(body.startswith(m) for m in markers)
        if not skip:
            kept.append(line)
    names = dict(fast.__globals__)
    exec(compile("\n".join(kept) + "\n", "<variant>", "exec"), names)  # noqa: S102 - our own source
    return names["fast"]


def parts(name: str, model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Where the call path's host time goes: the replay function with parts removed, and each part alone."""
    om = _called(model, args, kwargs, strategy="sequential")
    om(*args, **kwargs)  # the second call counts the outputs' uses: the replay function is final from here
    entry, graphed = om._last, om._last.graphed
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    fast, names = graphed.fast, graphed.fast.__globals__
    pairs = [(graphed._static[i], leaves[i]) for i in graphed._slots]
    direct = graphed._replay_graph

    def raw() -> None:
        for dst, src in pairs:
            dst.copy_(src)
        direct()

    calls = {"raw: copy inputs, replay (C method)": raw,
             "fast(leaves): the generated replay function": lambda: fast(leaves),
             "fast without the stream check": lambda f=_without(fast, "if SID()"): f(leaves),
             "fast without output protection": lambda f=_without(fast, "if UC(", "if RC("): f(leaves),
             "OparaModule call": lambda: om(*args, **kwargs)}
    for _ in range(50):
        for call in calls.values():
            call()
    host = _host_us(calls)
    rows = [f"| {name} | {k} | {v:.2f} |" for k, v in host.items()]
    lock = threading.RLock()

    def locked() -> None:
        with lock:
            pass

    alone = {"hot check (entry.hot)": lambda: entry.hot(args, kwargs), "RLock enter/exit": locked,
             "hook check (4 lookups)": lambda: om._forward_hooks or om._forward_pre_hooks}
    if "SID" in names:
        alone["stream id (SID())"] = names["SID"]
    if "UC" in names:
        alone["storage use count (UC)"] = lambda: names["UC"](names["O"][0].untyped_storage()._cdata)
    rows += [f"| {name} | alone: {k} | {_python_us(f):.3f} |" for k, f in alone.items()]
    om.release()
    return rows


def profile(name: str, model: nn.Module, args: tuple, kwargs: dict, calls: int = 4000) -> list[str]:
    """Where the host time of OparaModule's call goes: cProfile over ``calls`` calls queued behind a GPU sleep, the
    functions with the most own time (cProfile inflates Python frames; the shares are what to read)."""
    import cProfile
    import io
    import pstats

    om = _called(model, args, kwargs, strategy="sequential")
    prof = cProfile.Profile()
    for _ in range(calls // 100):
        torch.cuda._sleep(40_000_000)
        prof.enable()
        for _ in range(100):
            om(*args, **kwargs)
        prof.disable()
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    om.release()
    return ["", f"cProfile of {calls} calls of OparaModule sequential, {name} (own time, sorted):", "```",
            *[line for line in out.getvalue().splitlines() if line.strip()][-16:], "```"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", default=None)
    parser.add_argument("--python-path", action="store_true", help="time the Python call path on fake graphs (no GPU)")
    parser.add_argument("--parts", action="store_true", help="where the call path's host time goes, part by part")
    parser.add_argument("--cases", default="", help="only these cases (comma-separated name prefixes, e.g. "
                        "tiny,deepfm); skips the Hugging Face guard rows and the cProfile")
    ns = parser.parse_args()
    if ns.python_path:
        lines = [f"CPU, torch {torch.__version__}, command: PYTHONPATH=. python benchmarks/call_overhead.py "
                 "--python-path", "", "| model | raw copy+replay us | OparaModule us | over raw | hot check us |",
                 "|---|---|---|---|---|"]
        lines += [row for case in _cases("cpu") if case[0] != "googlenet" for row in python_path(*case)]
        emit(lines, ns.md)
        return
    if ns.parts:
        lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, command: PYTHONPATH=. python "
                 "benchmarks/call_overhead.py --parts", "", "| model | part | host us/call |", "|---|---|---|"]
        lines += [row for case in _cases()[:1] + _cases()[2:3] for row in parts(*case)]
        emit(lines, ns.md)
        return
    head = (f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"command: PYTHONPATH=. python benchmarks/call_overhead.py{' --cases ' + ns.cases if ns.cases else ''}")
    lines = [head, "", "| model | call path | host us/call (GPU busy, lower quartile of bursts) | "
             "over a raw replay of the same graph (quartiles) | over it, paired by round (median) | "
             "sync latency us (median) |", "|---|---|---|---|---|---|"]
    wanted = [w for w in ns.cases.split(",") if w]
    cases = [c for c in _cases() if not wanted or any(c[0].startswith(w) for w in wanted)]
    for case in cases:
        lines += measure(*case)
        print("\n".join(lines[-12:]), flush=True)
    if wanted:
        emit(lines, ns.md)
        return
    for name in ("bert", "t5"):  # Hugging Face models: many layers reading one config
        if name in models.available():
            model, args, kwargs = models.get(name, device="cuda")
            lines += guard_rows(name, model, args, kwargs)
    for case in cases[:2]:
        lines += profile(*case)
    emit(lines, ns.md)


if __name__ == "__main__":
    main()
