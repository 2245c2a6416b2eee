"""Merge the per-stage outputs of scripts/gpu_check.sh into one report: ``<dir>/<name>.md`` and ``<dir>/<name>.json``.

    python -m opara_nb.bench.collect benchmarks/results --name h100

Reads ``<dir>/parts/``: ``env.txt``, ``cuda_tests.txt``, ``bench_*.json``, ``sweep_*.json``, ``alloc.json`` (whatever
exists: it runs after every stage so a timeout still leaves a report). Writes a summary table (speed-up over the
sequential CUDA graph per model and mode), generated observations, and every full table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .harness import BenchResult
from .modes import MODES
from .sweep import AllocationTable, sweep_markdown

__all__ = ["collect", "summary_markdown", "observations", "slower_than_baseline", "main"]

_SUMMARY_MODES = tuple(MODES)


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{path.name}: {exc}"}


def _results(data: dict[str, Any]) -> list[BenchResult]:
    return [BenchResult.from_json(json.dumps(r)) for r in data.get("results", [])]


def _cell(res: BenchResult, mode: str, key: str) -> str:
    try:
        row = res.row(mode)
    except ValueError:
        return ""
    if row["status"] not in ("ok", "fallback"):
        return row["status"]
    lat = row.get(key + "_median_ms")
    ratio = row.get("speedup" if key == "sync" else "gpu_speedup")
    if lat is None:
        return "-"
    suffix = "" if row["status"] == "ok" else " (fallback)"
    return f"{lat:.3f}" + (f" ({ratio:.2f}x)" if ratio and mode != "cudagraph" else "") + suffix


def summary_markdown(results: Sequence[BenchResult], key: str = "sync") -> str:
    """Model x mode: median latency (ms) and speed-up over the sequential CUDA graph, ``key`` "sync" or "gpu"."""
    from tabulate import tabulate

    modes = [m for m in _SUMMARY_MODES if any(m in r.settings.get("modes", []) for r in results)]
    body = [[f"{r.model} (bs {r.settings.get('batch')})"] + [_cell(r, m, key) for m in modes] for r in results]
    return tabulate(body, headers=["model"] + modes, tablefmt="github", disable_numparse=True)


def _ok_row(res: BenchResult, mode: str) -> dict[str, Any] | None:
    try:
        row = res.row(mode)
    except ValueError:
        return None
    return row if row["status"] == "ok" else None


def _lat(res: BenchResult, mode: str, key: str = "sync") -> float | None:
    row = _ok_row(res, mode)
    return row.get(f"{key}_median_ms") if row else None


def _ratio(base: float | None, lat: float | None) -> str:
    return f"{base / lat:.2f}x" if base and lat else "-"


def _speedups(res: BenchResult, mode: str) -> str | None:
    """"opara 1.20x over the sequential CUDA graph (GPU-side 1.35x)": synchronous first, the GPU-side one next to it."""
    base, lat = _lat(res, "cudagraph"), _lat(res, mode)
    if not (base and lat):
        return None
    return (f"{mode} {base / lat:.2f}x over the sequential CUDA graph "
            f"(GPU-side {_ratio(_lat(res, 'cudagraph', 'gpu'), _lat(res, mode, 'gpu'))})")


def slower_than_baseline(res: BenchResult) -> str | None:
    """Modes whose synchronous median is above cudagraph's by more than cudagraph's own p90 - median spread (beyond
    the baseline's noise), or None when none is or the baseline is missing. Eager is the reference the others beat,
    not a contender: never flagged."""
    base = _ok_row(res, "cudagraph")
    if not base or base.get("sync_median_ms") is None or base.get("sync_p90_ms") is None:
        return None
    median, spread = base["sync_median_ms"], base["sync_p90_ms"] - base["sync_median_ms"]
    slow = [f"{r['mode']}{' (fallback)' if r['status'] == 'fallback' else ''} +{r['sync_median_ms'] - median:.3f} ms"
            for r in res.rows if r["mode"] not in ("cudagraph", "eager") and r["status"] in ("ok", "fallback")
            and r.get("sync_median_ms") is not None and r["sync_median_ms"] - median > spread]
    if not slow:
        return None
    return f"FLAG slower than cudagraph by more than its p90-median spread ({spread:.3f} ms): " + ", ".join(slow)


def _auto_fact(res: BenchResult) -> str | None:
    base, auto = _lat(res, "cudagraph"), _lat(res, "auto")
    if not (base and auto):
        return None
    verdict = "never slower: OK" if auto <= base * 1.02 else "SLOWER than the baseline"
    row = _ok_row(res, "auto") or {}
    kept = row.get("kept") or row.get("strategy")
    gpu = _ratio(_lat(res, "cudagraph", "gpu"), _lat(res, "auto", "gpu"))
    return f"auto {base / auto:.2f}x (GPU-side {gpu}; {verdict}{f'; kept {kept}' if kept else ''})"


def observations(results: Sequence[BenchResult]) -> list[str]:
    """Facts read off the numbers: opara vs the baseline (synchronous and GPU-side), the launch-order ablation,
    auto's guarantee, compile, and every mode slower than the baseline beyond its noise."""
    lines = []
    for res in results:
        opara, topo, auto, comp = (_lat(res, m) for m in ("opara", "opara+topological", "auto", "compile"))
        facts = [f for f in (_speedups(res, "opara"),) if f]
        if opara and topo:
            facts.append(f"Alg. 2 launch order vs topological: {topo / opara:.2f}x")
        facts += [f for f in (_auto_fact(res),) if f]
        if comp and (auto or opara):
            best = min(x for x in (auto, opara) if x)
            facts.append(f"vs reduce-overhead: {comp / best:.2f}x")
        facts += [f for f in (slower_than_baseline(res),) if f]
        if facts:
            lines.append(f"{res.model} (bs {res.settings.get('batch')}): " + "; ".join(facts))
    return lines


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def collect(directory: Path, name: str = "h100") -> tuple[Path, Path]:
    """Write ``<directory>/<name>.md`` and ``.json`` from ``<directory>/parts``; returns their paths."""
    parts = directory / "parts"
    bench = [_load(p) for p in sorted(parts.glob("bench_*.json"))]
    sweeps = [_load(p) for p in sorted(parts.glob("sweep_*.json"))]
    alloc = _load(parts / "alloc.json") if (parts / "alloc.json").exists() else None
    results = [r for d in bench for r in _results(d)]
    env, tests = _read(parts / "env.txt"), _read(parts / "cuda_tests.txt")
    md = [f"# opara_nb benchmark: {name}\n", "```", env.strip(), "```\n"]
    if results:
        md += ["## Summary, batch 1: synchronous latency ms (speed-up over sequential CUDA graph)\n",
               summary_markdown(results, "sync"), "\n## GPU-side latency ms (host enqueue hidden)\n",
               summary_markdown(results, "gpu"), "\n## Observations (generated)\n"]
        md += [f"- {line}" for line in observations(results)] + [""]
    md += _sweep_sections(sweeps) + _alloc_section(alloc)
    md += ["## Full tables\n"] + [f"`{d.get('command', '')}`\n\n" + "\n".join(r.to_markdown() for r in _results(d))
                                  for d in bench]
    errors = [d["error"] for d in bench + sweeps if "error" in d]
    md += [f"- unreadable part: {e}" for e in errors]
    commands = _read(parts / "commands.txt").strip()
    if commands:
        md += ["## Commands run (scripts/gpu_check.sh)\n", "```", commands, "```\n"]
    if tests:
        md += ["## CUDA tests (`python -m pytest -m cuda -q -rs`), last lines\n", "```",
               "\n".join(tests.strip().splitlines()[-25:]), "```"]
    md_path, json_path = directory / f"{name}.md", directory / f"{name}.json"
    md_path.write_text("\n".join(md) + "\n")
    json_path.write_text(json.dumps({"env": env, "bench": bench, "sweep": sweeps, "alloc": alloc,
                                     "cuda_tests_tail": tests.strip().splitlines()[-25:]}, indent=2, default=str))
    return md_path, json_path


def _sweep_sections(sweeps: list[dict[str, Any]]) -> list[str]:
    out = []
    for data in sweeps:
        results = _results(data)
        if results:
            out += [f"## Batch sweep\n\n`{data.get('command', '')}`\n", sweep_markdown(results)]
    return out


def _alloc_section(alloc: dict[str, Any] | None) -> list[str]:
    if not alloc or "rows" not in alloc:
        return []
    table = AllocationTable(rows=alloc["rows"], strategies=alloc["strategies"])
    notes = [f"- {n}" for n in alloc.get("notes", [])]
    return ["## Stream allocation time\n", f"`{alloc.get('command', '')}`\n", *notes, "", table.to_markdown()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opara_nb.bench.collect", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--name", default="h100")
    ns = parser.parse_args(argv)
    for path in collect(ns.directory, ns.name):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
