"""Compile time of fused planning against torch.compile(mode="reduce-overhead"), cold and warm (issue 10's targets:
warm <= 5 s, cold <= 2x reduce-overhead). Run on the GPU machine from the checkout root:

    PYTHONPATH=. python benchmarks/compile_time.py [--model googlenet] [--md FILE] [--profile-warm]

(``--profile-warm``: the warm fused run once more under cProfile, printed; ``--device cpu``: a smoke test of this
script on a machine without a GPU, TorchInductor's C++ backend; ``--pycache DIR``: Python's bytecode cache for every
process in DIR, filled first by importing the compilers, as on a machine whose torch was installed by pip, which
compiles its bytecode at install: run 7 found the GPU machine's torch without it, 2.2 s of a warm run compiling
sources.)

Each measurement runs in a fresh process, so nothing compiled stays in memory; "cold" gives it empty cache folders
(TorchInductor's and Triton's, and opara_nb's profile cache), "warm" the folders its cold run filled. The time is
from the model built and on the GPU to the first result of the optimized module (planning, compiling, capturing), or,
for reduce-overhead, to the third call's result (compile, warm-up, CUDA graph record). "Again" is the same measurement
repeated in the same process on a new instance of the model: a notebook re-running the cell, imports done and
compiled code in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks._table import emit

_MARK = "COMPILE_TIME_JSON "


def _child(model_name: str, mode: str, device: str, profile: bool = False) -> None:
    import warnings

    import torch

    import opara_nb
    from opara_nb import models

    warnings.simplefilter("ignore")
    model, args, kwargs = models.get(model_name, device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()

    def first_result(model) -> tuple[float, object]:
        start = time.perf_counter()
        with torch.no_grad():
            if mode == "reduce-overhead":
                made = torch.compile(model, mode="reduce-overhead")
                for _ in range(3):
                    out = made(*args, **kwargs)
            else:
                made = opara_nb.optimize(model, *args, strategy="opara", fuse=True, **kwargs)
                out = made(*args, **kwargs)
            torch.utils._pytree.tree_map(lambda t: t.sum().item() if isinstance(t, torch.Tensor) else t, out)
        return time.perf_counter() - start, made

    seconds, made = first_result(model)
    if prof is not None:
        prof.disable()
        _print_profile(prof)
    # a notebook re-running the cell: a new instance of the model, in the same process
    again, _ = first_result(models.get(model_name, device=device)[0])
    extra = {"again": again}
    if mode != "reduce-overhead":
        extra.update(kept=made.report.kept, mode=made.report.mode)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(_MARK + json.dumps({"seconds": seconds, "torch": torch.__version__, "device": name, "bytecode": _bytecode(),
                              **extra}), flush=True)


def _bytecode() -> bool:
    """Whether TorchInductor's modules were imported from cached bytecode (else Python compiled their source)."""
    import importlib.util

    import torch._inductor.lowering as lowering

    return os.path.exists(importlib.util.cache_from_source(lowering.__file__))


_COMPILERS = "import torch._dynamo, torch._inductor.compile_fx, torch._inductor.lowering, torch._functorch.aot_autograd"


def _fill_pycache(env: dict) -> None:
    """Bytecode for what compiling imports, written to the cache folder before anything is timed."""
    subprocess.run([sys.executable, "-c", _COMPILERS + "; import opara_nb.models"], env=env, check=True)


def _print_profile(prof) -> None:
    """Where a run's time went: the functions with the most cumulative time (cProfile's own overhead included)."""
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue(), flush=True)


def _env(pycache: str | None) -> dict:
    env = dict(os.environ)
    if pycache:
        env["PYTHONPYCACHEPREFIX"] = pycache
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run(model_name: str, mode: str, device: str, caches: str, timeout: float, profile: bool = False,
         pycache: str | None = None) -> dict:
    env = dict(_env(pycache), TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"), OPARA_NB_CACHE_DIR=os.path.join(caches, "opara_nb"))
    cmd = [sys.executable, __file__, "--child", mode, "--model", model_name, "--device", device]
    cmd += ["--profile-warm"] if profile else []
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if profile:
        print("\n".join(line for line in done.stdout.splitlines() if not line.startswith(_MARK)), flush=True)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="googlenet")
    parser.add_argument("--md", default=None)
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--device", default="cuda", help="cuda (the record) or cpu (a smoke test of this script)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile-warm", action="store_true",
                        help="run the warm opara+fused measurement once more under cProfile and print where it went")
    parser.add_argument("--pycache", default=None, help="Python's bytecode cache folder for every process, filled "
                        "first (as pip's install-time compile would)")
    ns = parser.parse_args()
    if ns.child:
        _child(ns.model, ns.child, ns.device, ns.profile_warm)
        return
    rows = []
    if ns.pycache:
        _fill_pycache(_env(ns.pycache))
    with tempfile.TemporaryDirectory() as compiled, tempfile.TemporaryDirectory() as fused:
        for label, mode, caches in (("reduce-overhead, cold", "reduce-overhead", compiled),
                                    ("opara+fused, cold", "opara+fused", fused),
                                    ("opara+fused, warm", "opara+fused", fused),
                                    ("reduce-overhead, warm", "reduce-overhead", compiled)):
            result = _run(ns.model, mode, ns.device, caches, ns.timeout, pycache=ns.pycache)
            rows.append((label, result))
            print(label, result, flush=True)
        if ns.profile_warm:
            _run(ns.model, "opara+fused", ns.device, fused, ns.timeout, profile=True, pycache=ns.pycache)
    info = next((r for _, r in rows if "device" in r), {})
    where = "" if ns.device == "cuda" else f" --device {ns.device}"
    where += f" --pycache {ns.pycache}" if ns.pycache else ""
    lines = [f"device {info.get('device', '?')}, torch {info.get('torch', '?')}, command: PYTHONPATH=. python "
             f"benchmarks/compile_time.py --model {ns.model}{where}", "",
             "| model | mode | caches | seconds to the first result | again in the same process, a new instance | "
             "torch's bytecode cached |", "|---|---|---|---|---|---|"]
    for label, result in rows:
        mode, caches = label.split(", ")
        value = f"{result['seconds']:.1f} | {result['again']:.1f} | {result.get('bytecode', '?')}" \
            if "seconds" in result else result["error"]
        lines.append(f"| {ns.model} | {mode} | {caches} | {value} |")
    cold = {label: r.get("seconds") for label, r in rows}
    if cold.get("reduce-overhead, cold") and cold.get("opara+fused, cold"):
        lines += ["", f"cold opara+fused / cold reduce-overhead: "
                      f"{cold['opara+fused, cold'] / cold['reduce-overhead, cold']:.2f}x (target <= 2x); "
                      f"warm opara+fused: {cold.get('opara+fused, warm') or float('nan'):.1f} s (target <= 5 s)"]
    emit(lines, ns.md)


if __name__ == "__main__":
    main()
