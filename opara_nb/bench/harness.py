"""``benchmark()``: every mode in one process on the same inputs, and ``BenchResult``, the table it prints.

Each mode is built, checked against eager (max abs diff), timed synchronously and on the GPU side, its peak memory
read, and released (graphs freed, device synchronized, cache emptied) before the next one, so that modes do not share
memory pools or L2. A failing mode becomes a row that says why; it never stops the others.

Fairness: when an opara mode is asked for, the model is profiled once before any mode is timed. Profiling attaches
the profiler (CUPTI) to the process, which can slow later CUDA-graph launches; the opara modes profile anyway (cached
by graph, so they reuse this profile), and profiling first puts every mode, eager and cudagraph included, in the same
process state.
"""
from __future__ import annotations

import datetime
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from .._tensors import max_abs_diff
from ..capture.sandbox import Sandbox, clone_inputs
from ..errors import OparaUsageError, one_line
from .modes import (CPU_DEFAULT_MODES, DEFAULT_MODES, MODES, Built, Unavailable, build_mode, is_mode,
                    opara_mode,
                    map_tensors, tensor_leaves)
from .timing import time_gpu, time_sync

__all__ = ["benchmark", "run_benchmark", "BenchResult", "CPU_NOTE", "PROFILED_FIRST_NOTE", "environment", "COLUMNS"]

CPU_NOTE = "no CUDA: eager and plan-ordered execution only; nothing is accelerated"
PROFILED_FIRST_NOTE = "profiled before timing so every mode runs in the same process state"
CPU_INPUTS_NOTE = ("model and inputs are on the CPU: eager and plan-ordered execution only; nothing is accelerated "
                   "(move both to CUDA to measure the GPU modes)")

# (row key, column title) of the printed table; every key is present in every row (None when not applicable)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("mode", "mode"), ("status", "status"), ("run_mode", "ran as"), ("plan", "strategy/order"),
    ("streams", "streams L/P"), ("sync_median_ms", "sync ms"), ("sync_p90_ms", "sync p90"),
    ("gpu_median_ms", "GPU ms"), ("gpu_p90_ms", "GPU p90"), ("speedup", "speed-up"), ("gpu_speedup", "GPU speed-up"),
    ("peak_mem_mb", "peak MB"), ("max_abs_diff", "max abs diff"), ("planning_ms", "profile/plan/capture ms"),
    ("critical_path_ms", "crit. path ms"),
)
_ROW_KEYS = ("mode", "status", "reason", "run_mode", "strategy", "order", "graphs", "nodes", "logical_streams",
             "physical_streams", "sync_median_ms", "sync_p90_ms", "gpu_median_ms", "gpu_p90_ms", "speedup",
             "gpu_speedup", "peak_mem_mb", "resident_mem_mb", "max_abs_diff", "profile_ms", "plan_ms", "capture_ms",
             "critical_path_ms", "candidates", "kept", "eager_ms", "requested")


def environment() -> dict[str, Any]:
    """Device, versions and numerics settings, recorded with every result (TF32 is left as the user set it)."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _squeeze(text: Any, limit: int = 240) -> str:
    """A reason squeezed onto one line for tables (the JSON keeps it whole)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "plan":
        return f"{row['strategy']}/{row['order']}" if row.get("strategy") else "-"
    if key == "streams":
        return f"{row['logical_streams']}/{row['physical_streams']}" if row.get("logical_streams") else "-"
    if key in ("speedup", "gpu_speedup"):
        return f"{row[key]:.2f}x" if row.get(key) else "-"
    if key == "planning_ms":
        parts = [row.get(k) for k in ("profile_ms", "plan_ms", "capture_ms")]
        return "-" if all(p is None for p in parts) else "/".join(_fmt(p, 0) if p is not None else "-" for p in parts)
    if key == "max_abs_diff":
        return "-" if row.get(key) is None else f"{row[key]:.1e}"
    if key == "peak_mem_mb":
        return _fmt(row.get(key), 1)
    return _fmt(row.get(key))


@dataclass
class BenchResult:
    """Rows (one dict per mode) plus the environment they were measured in. Prints itself as a table.

    >>> res = opara_nb.benchmark(model, x)           # doctest: +SKIP
    >>> res.speedup("opara")                           # sequential CUDA graph latency / opara latency
    """

    model: str
    rows: list[dict[str, Any]]
    env: dict[str, Any] = field(default_factory=environment)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(self, mode: str) -> dict[str, Any]:
        for row in self.rows:
            if row["mode"] == mode:
                return row
        raise OparaUsageError(f"mode {mode!r} was not benchmarked; rows: {', '.join(r['mode'] for r in self.rows)}")

    def speedup(self, mode: str) -> float | None:
        """Synchronous latency of the sequential CUDA graph divided by that of ``mode`` (None if either is missing)."""
        return self.row(mode).get("speedup")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_json(cls, text: str) -> "BenchResult":
        data = json.loads(text)
        return cls(data["model"], data["rows"], data.get("env", {}), data.get("settings", {}), data.get("notes", []))

    def table(self, tablefmt: str = "github") -> str:
        from tabulate import tabulate

        body = [[_cell(row, key) for key, _ in COLUMNS] for row in self.rows]
        return tabulate(body, headers=[title for _, title in COLUMNS], tablefmt=tablefmt, disable_numparse=True)

    def _header(self) -> str:
        e, s = self.env, self.settings
        head = (f"{self.model} (batch {s.get('batch', '?')}) on {e.get('device')}, torch {e.get('torch')}, "
                f"TF32 matmul={e.get('allow_tf32_matmul')} cudnn={e.get('allow_tf32_cudnn')}, "
                f"iters={s.get('iters')} warmup={s.get('warmup')}, {e.get('date')}")
        return head + (f"; {PROFILED_FIRST_NOTE}" if s.get("profiled_first") else "")

    def _footnotes(self) -> list[str]:
        lines = list(self.notes)
        lines += [f"{r['mode']}: {r['status']}: {_squeeze(r['reason'])}" for r in self.rows if r.get("reason")]
        lines += [line for r in self.rows if (line := _candidates_line(r))]
        return lines

    def to_markdown(self) -> str:
        notes = "".join(f"\n- {line}" for line in self._footnotes())
        return f"**{self._header()}**\n\n{self.table('github')}\n{notes}\n"

    def __repr__(self) -> str:
        notes = "".join(f"\n  {line}" for line in self._footnotes())
        return f"{self._header()}\n{self.table('simple')}{notes}"

    def _repr_html_(self) -> str:
        import html

        notes = "".join(f"<li>{html.escape(line)}</li>" for line in self._footnotes())
        return (f"<div><p><b>{html.escape(self._header())}</b></p>{self.table('html')}"
                f"{f'<ul>{notes}</ul>' if notes else ''}</div>")


def _candidates_line(row: dict[str, Any]) -> str | None:
    """What auto measured at capture time: per candidate "sync/replay" ms, the kept one marked."""
    times = row.get("candidates") or {}
    if not times:
        return None
    kept = row.get("kept")
    cells = [f"{name} {_fmt(t.get('sync_ms'))}/{_fmt(t.get('replay_ms'))}{' (kept)' if name == kept else ''}"
             for name, t in times.items()]
    return f"{row['mode']}: candidates sync/replay ms: " + ", ".join(cells)


def _empty_row(mode: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_ROW_KEYS)
    row.update(mode=mode, status="ok")
    return row


def _measure(row: dict[str, Any], built: Built, reference: Any, iters: int, warmup: int, cuda: bool) -> None:
    out = map_tensors(lambda t: t.detach().clone(), built.call())
    row["max_abs_diff"] = max_abs_diff(reference, out)
    sync = time_sync(built.call, iters, warmup, cuda)
    row["sync_median_ms"], row["sync_p90_ms"] = sync.median_ms, sync.p90_ms
    gpu = time_gpu(built.call, iters, warmup=2) if cuda else None
    if gpu is not None:
        row["gpu_median_ms"], row["gpu_p90_ms"] = gpu.median_ms, gpu.p90_ms


def _apply_info(row: dict[str, Any], info: dict[str, Any]) -> None:
    row.update({k: v for k, v in info.items() if k in row})
    if row["run_mode"] == "eager" and row["mode"] != "eager":
        row["status"] = "fallback"  # opara_nb ran the original model: the report's reason says why


def _run_mode(mode: str, model: Callable, args: tuple, kwargs: dict, reference: Any, iters: int, warmup: int,
              cuda: bool) -> dict[str, Any]:
    row = _empty_row(mode)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    built = None
    try:
        built = build_mode(mode, model, args, kwargs, cuda)
        _apply_info(row, built.info)
        if cuda:
            row["resident_mem_mb"] = (torch.cuda.memory_allocated() - base) / 2**20
        _measure(row, built, reference, iters, warmup, cuda)
        if built.refresh is not None:
            _apply_info(row, built.refresh())
        if cuda:
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Unavailable as exc:
        row.update(status="unavailable", reason=str(exc))
    except Exception as exc:  # one broken mode must not hide the others' numbers
        row.update(status="failed", reason=one_line(exc))
    finally:
        _release(built, row)
        built = None  # the last reference to the mode's module and graphs: nothing of it may outlive the mode
        _settle(cuda)
    return row


def _release(built: Built | None, row: dict[str, Any]) -> None:
    """Free the mode's graphs and pools before the next mode is built; a failure here is recorded, not raised."""
    if built is None:
        return
    try:
        built.release()
    except Exception as exc:
        row["reason"] = (row["reason"] + "; " if row["reason"] else "") + f"release failed: {one_line(exc)}"


def _settle(cuda: bool) -> None:
    """Collect what the last mode left (modules and graphs can sit in reference cycles), wait for the device and
    hand cached blocks back, so the next mode is timed without the last one's graphs competing for memory or L2."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _profile_first(model: Callable, args: tuple, kwargs: dict, chosen: list[str], cuda: bool) -> dict[str, Any]:
    """Profile the model once before any mode is timed, when an opara mode will profile it anyway (see the module
    docstring); returns settings for the result. A failure is recorded: the opara rows will show their own error."""
    if not any(opara_mode(mode) is not None for mode in chosen):
        return {"profiled_first": False}
    from ..profiling import profile_model  # read at call time, so tests can stand in for the profile layer

    start = time.perf_counter()
    try:
        profile_model(model, *args, **kwargs)
        return {"profiled_first": True, "profile_first_ms": (time.perf_counter() - start) * 1e3}
    except Exception as exc:  # the opara modes hit the same error and report it in their rows
        return {"profiled_first": False, "profile_first_error": one_line(exc)}
    finally:
        _settle(cuda)


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["mode"] == "cudagraph" and r["status"] == "ok"), None)
    for row in rows:
        for key, lat in (("speedup", "sync_median_ms"), ("gpu_speedup", "gpu_median_ms")):
            if base and base.get(lat) and row.get(lat):
                row[key] = base[lat] / row[lat]


def _check_modes(modes: Iterable[str]) -> list[str]:
    chosen = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    unknown = [m for m in chosen if not is_mode(m)]
    if unknown or not chosen:
        raise OparaUsageError(f"unknown benchmark mode(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from: {', '.join(MODES)} or any plan name (strategy[+order][+fused])")
    return chosen


def _on_cuda(model: Any, args: tuple, kwargs: dict) -> bool:
    if not torch.cuda.is_available():
        return False
    tensors = tensor_leaves((args, kwargs))
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    return any(t.is_cuda for t in tensors + params)


def benchmark(model: Callable, *args: Any, modes: Iterable[str] | str | None = None, iters: int = 200,
              warmup: int = 20, **kwargs: Any) -> BenchResult:
    """Measure ``modes`` of ``model(*args, **kwargs)`` in this process, on these inputs; returns a BenchResult.

    Modes (``MODES``): eager, cudagraph (plain CUDA graph), opara and other plan names, auto, compile. Without
    CUDA only eager and plan-ordered (opara_nb, no streams) execution run; the others are rows that say why. When
    an opara mode is asked for, the model is profiled once before anything is timed, so every mode runs in the same
    process state (the profiler can leave later CUDA-graph launches slower; the opara modes reuse this profile).

    >>> res = opara_nb.benchmark(model, x, modes="eager,cudagraph,opara", iters=200)   # doctest: +SKIP
    >>> print(res.to_markdown())                                                        # doctest: +SKIP
    """
    return run_benchmark(model, args, kwargs, modes=modes, iters=iters, warmup=warmup)


def run_benchmark(model: Callable, args: tuple, kwargs: dict, modes: Iterable[str] | str | None = None,
                  iters: int = 200, warmup: int = 20, label: str | None = None,
                  on_row: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """``benchmark`` with the model's inputs passed explicitly, a ``label`` for the table and ``on_row``, called with
    the result so far after every mode (the CLI saves partial results with it, so a timeout loses one mode at most)."""
    if not callable(model):
        raise OparaUsageError(f"benchmark() needs a callable model, got {type(model).__name__}")
    if iters < 1 or warmup < 0:
        raise OparaUsageError(f"benchmark() needs iters >= 1 and warmup >= 0, got iters={iters} warmup={warmup}")
    cuda = _on_cuda(model, args, kwargs)
    chosen = _check_modes(modes if modes is not None else (DEFAULT_MODES if cuda else CPU_DEFAULT_MODES))
    notes = [] if cuda else [CPU_INPUTS_NOTE if torch.cuda.is_available() else CPU_NOTE]
    batch = next((t.shape[0] for t in tensor_leaves((args, kwargs)) if t.dim() > 0), None)
    settings = {"iters": iters, "warmup": warmup, "batch": batch, "modes": chosen}
    result = BenchResult(label or type(model).__name__, [], environment(), settings, notes)
    # Every mode runs the forward many times: on copies of the inputs, with the model's state put back afterwards.
    args, kwargs = clone_inputs(args, kwargs)
    with torch.no_grad(), Sandbox(model):
        reference = map_tensors(lambda t: t.detach().clone(), model(*args, **kwargs))
        settings.update(_profile_first(model, args, kwargs, chosen, cuda))
        if settings.get("profile_first_error"):
            notes.append(f"profiling before timing failed ({settings['profile_first_error']}): modes ran in "
                         "different process states")
        for mode in chosen:
            result.rows.append(_run_mode(mode, model, args, kwargs, reference, iters, warmup, cuda))
            _add_speedups(result.rows)
            if on_row is not None:
                on_row(result)
    return result
