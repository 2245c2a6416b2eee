"""Command line: ``python -m opara_nb demo`` (see a plan on a bundled model), ``bench`` (measure), ``alloc``
(stream allocation time), ``profile`` (per-operator profile) and ``tune`` (write a plan file for your model).

    python -m opara_nb demo --model inception_block --out opara_demo_out
    python -m opara_nb bench --model googlenet --batch 1 --modes eager,cudagraph,opara --json out.json --md out.md
    python -m opara_nb bench --model inception_v3 --batch 1,2,4,8,16,32       # batch sweep (paper Fig. 8/9)
    python -m opara_nb alloc --model all                                      # allocation time (paper Table 1)
    python -m opara_nb profile --model googlenet --device cuda --json p.json  # per-operator profile and checks
    python -m opara_nb tune --factory mypkg.models:build --inputs "randn(1,3,224,224)" -o plan.json

Usage errors (unknown model or mode, bad batch list) exit with status 2 and a message listing what is valid.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "PAPER_SIX", "resolve_models"]

# the paper's six models, in its order; "all" means these
PAPER_SIX: tuple[str, ...] = ("googlenet", "inception_v3", "nasnet", "deepfm", "bert", "t5")
# what to run instead when a paper model's library is not installed
_FALLBACK = {"googlenet": "inception_block", "inception_v3": "inception_block", "nasnet": "inception_block",
             "bert": "tiny_transformer", "t5": "tiny_transformer"}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch wants positive integers separated by commas, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--batch wants positive integers separated by commas, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from .bench.modes import DEFAULT_MODES, MODES
    from .models import names

    parser = argparse.ArgumentParser(
        prog="opara-nb", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="opara_nb: run independent PyTorch operators in parallel on CUDA streams inside one CUDA Graph.\n\n"
                    "examples:\n"
                    "  python -m opara_nb demo                      # plan, profile, stream graph of a bundled model\n"
                    "  python -m opara_nb bench --model googlenet --modes eager,cudagraph,opara,compile\n"
                    "  python -m opara_nb bench --model inception_v3 --batch 1,2,4,8   # batch sweep\n"
                    "  python -m opara_nb alloc --model all          # stream allocation time per strategy\n"
                    "  python -m opara_nb profile --model googlenet  # per-operator kernels, time, class\n"
                    "  python -m opara_nb tune --factory mypkg.models:build --inputs \"randn(1,3,224,224)\" "
                    "-o plan.json\n"
                    "  python -m opara_nb bench --help              # all options of one command",
        epilog=f"models: {', '.join(names())}, all (= {', '.join(PAPER_SIX)})\n"
               f"modes: " + "".join(f"\n  {m:11s} {d}" for m, d in MODES.items()))
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,alloc,profile,tune}")

    demo = sub.add_parser("demo", help="optimize a bundled model, print its report and profile, draw its streams")
    demo.add_argument("--model", default="inception_block", help="model name (default: inception_block)")
    demo.add_argument("--out", default="opara_demo_out", help="folder for the stream graph (default: ./opara_demo_out)")
    demo.add_argument("--iters", type=int, default=20, help="timed calls per mode in the short benchmark (default 20)")

    bench = sub.add_parser("bench", help="benchmark modes side by side on one or more models / batch sizes",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"default modes: {','.join(DEFAULT_MODES)} (add compile for torch.compile)")
    bench.add_argument("--model", default="inception_block", help="name, comma list, or 'all' (the paper's six)")
    bench.add_argument("--batch", type=_batches, default=[1], help="batch size or comma list to sweep (default 1)")
    bench.add_argument("--modes", default=None, help=f"comma list of: {','.join(MODES)}")
    bench.add_argument("--iters", type=int, default=200, help="timed calls per mode and latency (default 200)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed calls before timing (default 20)")
    bench.add_argument("--json", default=None, help="write all results as JSON to this path")
    bench.add_argument("--md", default=None, help="write all results as markdown to this path")

    alloc = sub.add_parser("alloc", help="time stream allocation per strategy on model DAGs (paper Table 1)")
    alloc.add_argument("--model", default="all", help="name, comma list, or 'all' (the paper's six)")
    alloc.add_argument("--json", default=None, help="write the table as JSON to this path")
    alloc.add_argument("--md", default=None, help="write the table as markdown to this path")
    _add_profile_parser(sub)
    _add_tune_parser(sub)
    return parser


def _add_tune_parser(sub: Any) -> None:
    from .tune import INPUTS_EXAMPLE, MAKERS

    tune = sub.add_parser(
        "tune", help="tune your model once (profile, time the candidates) and write its plan file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the model with --factory, optimize it on the --inputs and write the plan file that\n"
                    "opara_nb.optimize(model, *inputs, plan=PATH) and torch.compile(model, backend=\"opara\",\n"
                    "options={\"plan\": PATH}) load without profiling or timing anything.",
        epilog=f"--inputs: positional and keyword inputs, e.g. {INPUTS_EXAMPLE}.\n"
               f"Tensor makers: {', '.join(MAKERS)} (torch's arguments; dtype=float16 etc.); numbers,\n"
               "strings, tuples, lists and dicts as they are. Only the factory runs code.")
    tune.add_argument("--factory", required=True,
                      help="module:function (or path/to/file.py:function) that returns the model")
    tune.add_argument("--inputs", required=True, help="the example inputs (see below)")
    tune.add_argument("-o", "--out", required=True, help="where to write the plan file (JSON)")
    tune.add_argument("--strategy", default="auto", help="auto (default: measure the candidates, keep the fastest) "
                                                        "or one stream strategy")
    tune.add_argument("--fuse", action="store_true", help="add TorchInductor-fused candidates")
    tune.add_argument("--device", default=None, type=_device_name,
                      help="cuda (the default when a GPU is present) or cpu")
    tune.add_argument("--seed", type=int, default=0, help="seed for the factory's weights and random inputs "
                                                         "(default 0)")


def _add_profile_parser(sub: Any) -> None:
    from .profiling import DEMANDS

    prof = sub.add_parser("profile", help="profile a bundled model per operator and print the attribution checks")
    prof.add_argument("--model", default="inception_block", help="model name (default: inception_block)")
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--device", default=None, type=_device_name,
                      help="cuda (the default when a GPU is present) or cpu")
    prof.add_argument("--top", type=int, default=25, help="rows to print (most expensive operators)")
    prof.add_argument("--demand", default=DEMANDS[0], choices=DEMANDS)
    prof.add_argument("--json", default=None, help="write the profile as JSON to this path")
    prof.add_argument("--trace", default=None, help="write a Chrome trace of per-operator spans to this path")


def resolve_models(spec: str, parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(model names to run, notes): expands 'all', replaces paper models whose library is missing by bundled ones."""
    from .models import names
    from .models.zoo import PAPER_MODELS

    wanted = list(PAPER_SIX) if spec.strip() == "all" else _csv(spec)
    unknown = [n for n in wanted if n not in names()]
    if unknown or not wanted:
        parser.error(f"unknown model {', '.join(unknown) or '(none)'}; valid: {', '.join(names())}, all")
    chosen, notes = [], []
    for name in wanted:
        if name in PAPER_MODELS and not PAPER_MODELS[name].installed():
            if spec.strip() != "all":
                bundled = ", ".join(sorted(set(_FALLBACK.values())))
                library = PAPER_MODELS[name].library
                parser.error(f"model {name} needs {library}: pip install {library}  "
                             f"(or pick a bundled model: {bundled})")
            fallback = _FALLBACK[name]
            notes.append(f"{name}: {PAPER_MODELS[name].library} is not installed; ran bundled {fallback} instead")
            name = fallback
        if name not in chosen:
            chosen.append(name)
    return chosen, notes


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")


def _check_modes(text: str | None, parser: argparse.ArgumentParser) -> list[str] | None:
    from .bench.modes import MODES, is_mode

    if text is None:
        return None
    modes = _csv(text)
    unknown = [m for m in modes if not is_mode(m)]
    if unknown or not modes:
        parser.error(f"unknown mode {', '.join(unknown) or '(none)'}; valid: {', '.join(MODES)}")
    return modes


def _save(ns: argparse.Namespace, notes: list[str], results: list[Any]) -> None:
    """Write --json / --md with every result so far (called after each mode: a timeout keeps what was measured)."""
    from .bench import sweep_markdown

    command = "python -m opara_nb " + " ".join(shlex.quote(a) for a in ns.argv)
    md = [f"`{command}`\n"] + [f"- {n}" for n in notes] + [r.to_markdown() for r in results]
    if len(ns.batch) > 1 and results:
        md.append(sweep_markdown(results))
    for path, text in ((ns.md, "\n".join(md)),
                       (ns.json, json.dumps({"command": command, "notes": notes,
                                             "results": [r.to_dict() for r in results]}, indent=2, default=str))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


def _cmd_bench(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import sweep_markdown
    from .errors import one_line
    from .bench.harness import run_benchmark
    from .models import get

    modes = _check_modes(ns.modes, parser)
    models, notes = resolve_models(ns.model, parser)
    if ns.iters < 1 or ns.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    for line in notes:
        print(f"note: {line}")
    done: list[Any] = []
    failed = False
    for name in models:
        per_model = []
        for batch in ns.batch:
            try:
                model, args, kwargs = get(name, batch=batch, device=_device())
                res = run_benchmark(model, args, kwargs, modes=modes, iters=ns.iters, warmup=ns.warmup, label=name,
                                    on_row=lambda partial: _save(ns, notes, done + [partial]))
            except Exception as exc:  # a model that cannot be built must not cost the other models their numbers
                failed = True
                notes.append(f"{name} (batch {batch}) failed: {one_line(exc)}")
                print(f"error: {notes[-1]}", file=sys.stderr, flush=True)
                continue
            print(repr(res), "\n", flush=True)
            done.append(res)
            per_model.append(res)
            del model, args, kwargs
        if len(ns.batch) > 1 and per_model:
            print(sweep_markdown(per_model), flush=True)
    _save(ns, notes, done)
    for path in (ns.md, ns.json):
        if path:
            print(f"wrote {path}")
    return 1 if failed else 0


def _cmd_alloc(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import allocation_table

    models, notes = resolve_models(ns.model, parser)
    table = allocation_table(models)
    print("".join(f"note: {n}\n" for n in notes) + repr(table))
    command = "python -m opara_nb " + " ".join(shlex.quote(a) for a in ns.argv)
    _write(ns.md, f"`{command}`\n\n" + "".join(f"- {n}\n" for n in notes) + "\n" + table.to_markdown())
    _write(ns.json, json.dumps({"command": command, "notes": notes, **json.loads(table.to_json())}, indent=2))
    return 0


def _profile_checks(prof: Any, seconds: list[float]) -> list[str]:
    """What a recorded profile run shows besides the table: time to profile, kernel attribution, classes."""
    from collections import Counter

    lines = [f"profiling time per run (cache off): {', '.join(f'{s:.3f} s' for s in seconds)}"]
    for _, gp in prof.graphs:
        attributed = sum(p.kernel_ms for p in gp.nodes.values())
        lines.append(f"graph {gp.index}: per-node kernel time {attributed:.4f} ms vs profiler total "
                     f"{gp.profiler_kernel_ms} ms; {gp.unattributed} unattributed GPU activities")
        classes = Counter((p.op, p.kind) for p in gp.nodes.values())
        lines.append(f"graph {gp.index}: (op, class) counts: {dict(sorted(classes.items()))}")
    return lines


def _cmd_profile(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    from tabulate import tabulate

    from .capture import capture_graphs
    from .models import get, names
    from .profiling import ModelProfile, profile_graph

    device = ns.device or _device()
    if device.startswith("cuda") and _device() != "cuda":
        parser.error("--device cuda: no CUDA GPU here; use --device cpu (CPU times, FLOPs and bytes only)")
    if ns.model not in names():
        parser.error(f"unknown model {ns.model}; valid: {', '.join(names())}")
    model, args, kwargs = get(ns.model, batch=ns.batch, device=device)
    graphs = capture_graphs(model, args, kwargs)
    seconds, profiles = [], []
    for _ in range(2):  # the second run is the one after warm-up
        start = time.perf_counter()
        profiles = [profile_graph(g, demand=ns.demand, cache=False) for g in graphs]
        seconds.append(time.perf_counter() - start)
    prof = ModelProfile(list(zip(graphs, profiles)))
    print(prof._summary())
    print("\n".join(prof.notes() + _profile_checks(prof, seconds)))
    print(tabulate(prof.table(top=ns.top), headers="keys"))
    if ns.json:
        _write(ns.json, prof.to_json(indent=1))
    if ns.trace:
        prof.to_chrome_trace(ns.trace)
    return 0


def _cmd_tune(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .errors import OparaUsageError, one_line
    from .runtime import optimize
    from .tune import build_model, parse_inputs

    device = ns.device or _device()
    if device.startswith("cuda") and _device() != "cuda":
        parser.error("--device cuda: no CUDA GPU here; use --device cpu (nothing is measured without a GPU)")
    try:
        model = build_model(ns.factory, device, seed=ns.seed)
        args, kwargs = parse_inputs(ns.inputs, device, seed=ns.seed)
        om = optimize(model, *args, strategy=ns.strategy, fuse=ns.fuse, model_kwargs=kwargs)
    except OparaUsageError as exc:
        parser.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the factory's or the model's own error: one line, not our frames
        parser.error(f"tune stopped: {one_line(exc)} (check that {ns.factory}() builds the "
                     f"model and that it runs on --inputs {ns.inputs!r})")
    print(om.report)
    path = om.save_plan(ns.out)
    print(f"wrote {path}: load it with opara_nb.optimize(model, *inputs, plan={str(path)!r})")
    return 0


def _device_name(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu or cuda (cuda:N for another GPU)")


def _check_outputs(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Output paths that cannot be files, refused before anything runs (a benchmark would be lost at its end)."""
    for option in ("json", "md", "trace", "out"):
        path = getattr(ns, option, None)
        if path is None or (ns.command == "demo" and option == "out"):
            continue
        if Path(path).is_dir():
            parser.error(f"--{option} {path}: that is a folder; give a file path")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opara-nb`` and ``python -m opara_nb``; returns the exit status."""
    from .errors import OparaUsageError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    ns.argv = argv  # recorded with the results: the exact command
    if ns.command is None:
        parser.print_help()
        return 0
    _check_outputs(ns, parser)
    try:
        return _run(ns, parser)
    except OparaUsageError as exc:  # a mistake in what was asked: one line, as argparse's own
        parser.error(str(exc))
    except OSError as exc:  # an output that cannot be written (a folder, no permission, no such folder)
        if exc.filename is None:
            raise
        parser.error(f"cannot write {exc.filename}: {exc.strerror}")


def _run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if ns.command == "demo":
        from .bench.demo import run_demo
        from .models import names

        if ns.model not in names():
            parser.error(f"unknown model {ns.model}; valid: {', '.join(names())}")
        if ns.iters < 1:
            parser.error("--iters must be >= 1")
        return run_demo(ns.model, Path(ns.out), iters=ns.iters)
    commands = {"bench": _cmd_bench, "alloc": _cmd_alloc, "profile": _cmd_profile, "tune": _cmd_tune}
    return commands[ns.command](ns, parser)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
