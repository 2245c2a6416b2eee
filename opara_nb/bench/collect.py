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
from .sweep import AllocationTable, sweep_markdown

__all__ = ["collect", "summary_markdown", "observations", "main"]

_SUMMARY_MODES = ("eager", "cudagraph", "opara", "nimble", "wavefront", "opara-topo", "auto", "compile")


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


def _lat(res: BenchResult, mode: str) -> float | None:
    try:
        row = res.row(mode)
    except ValueError:
        return None
    return row.get("sync_median_ms") if row["status"] == "ok" else None


def observations(results: Sequence[BenchResult]) -> list[str]:
    """Facts read off the numbers: opara vs the baseline, the launch-order ablation, auto's guarantee, compile."""
    lines = []
    for res in results:
        base, opara, topo, auto, comp = (_lat(res, m) for m in ("cudagraph", "opara", "opara-topo", "auto", "compile"))
        facts = []
        if base and opara:
            facts.append(f"opara {base / opara:.2f}x over the sequential CUDA graph")
        if opara and topo:
            facts.append(f"Alg. 2 launch order vs topological: {topo / opara:.2f}x")
        if base and auto:
            verdict = "never slower: OK" if auto <= base * 1.02 else "SLOWER than the baseline"
            facts.append(f"auto {base / auto:.2f}x ({verdict})")
        if comp and (auto or opara):
            best = min(x for x in (auto, opara) if x)
            facts.append(f"vs reduce-overhead: {comp / best:.2f}x")
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
