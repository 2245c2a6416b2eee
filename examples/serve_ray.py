"""Serve a model through opara_nb on Ray Serve replicas, each loading the plan file tuned once: no replica profiles
or times anything, and every replica runs the same plan.

    pip install -e ".[serve]"                                           # Ray Serve
    python -m opara_nb tune --factory opara_nb.models:InceptionNet --inputs "randn(1,3,64,64)" -o plan.json
    python examples/serve_ray.py --factory opara_nb.models:InceptionNet --inputs "randn(1,3,64,64)" \\
        --plan plan.json --replicas 2
    curl -s -X POST http://127.0.0.1:8000/ -d '{"inputs": [[[[0.0, ...]]]]}'   # {"outputs": ...}

``--check`` sends a few requests instead of serving forever, compares them with the model run eagerly and prints
each replica's report (device, where its plan came from, graphs profiled), then shuts down.

A replica uses the GPU when it has one (each gets ``1 / replicas`` of the GPUs by default) and the CPU otherwise,
saying which; on the CPU the plan runs eagerly in its launch order, not accelerated, with the same outputs. Use your
own model by pointing ``--factory`` at a function that builds it (loading its checkpoint); the plan file refuses a
model or inputs it was not tuned for, with a one-line error in the replica's log.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from ray import serve
from torch.utils import _pytree as pytree

__all__ = ["OparaDeployment", "build_app", "replica_reports", "main"]


@serve.deployment
class OparaDeployment:
    """One replica: builds the model with ``factory``, loads ``plan`` with example inputs from ``inputs`` (the
    same expressions as ``python -m opara_nb tune``) and serves calls through the OparaModule."""

    def __init__(self, factory: str, inputs: str, plan: str, seed: int = 0) -> None:
        import opara_nb
        from opara_nb.tune import build_model, parse_inputs

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        where = "on the GPU" if self.device == "cuda" else "on the CPU (no GPU: the plan runs eagerly, not accelerated)"
        print(f"opara_nb replica: serving {factory} {where} with plan {plan}", flush=True)
        model = build_model(factory, self.device, seed=seed)
        self.example = parse_inputs(inputs, self.device, seed=seed)
        args, kwargs = self.example
        # clone_outputs=True (optimize's default): a response may still be serialised while the next call replays
        self.model = opara_nb.optimize(model, *args, plan=plan, **kwargs)

    def infer(self, inputs: list, kwargs: dict | None = None) -> Any:
        """Positional (and keyword) inputs as nested lists, shaped and typed like the example inputs; the outputs as
        nested lists."""
        args, kw = self._tensors(inputs, kwargs or {})
        with torch.no_grad():
            out = self.model(*args, **kw)
        return pytree.tree_map(lambda t: t.tolist() if isinstance(t, torch.Tensor) else t, out)

    def _tensors(self, inputs: list, kwargs: dict) -> tuple[list, dict]:
        args_ex, kwargs_ex = self.example

        def convert(value: Any, example: Any) -> Any:
            if isinstance(example, torch.Tensor):
                return torch.as_tensor(value, dtype=example.dtype, device=self.device)
            return value

        return ([convert(v, e) for v, e in zip(inputs, args_ex)],
                {k: convert(v, kwargs_ex.get(k)) for k, v in kwargs.items()})

    async def __call__(self, request: Any) -> dict:
        """HTTP: POST {"inputs": [...], "kwargs": {...}} -> {"outputs": ...}."""
        body = await request.json()
        return {"outputs": self.infer(body["inputs"], body.get("kwargs"))}

    def report(self) -> dict:
        """This replica's id, device and the module's report (``plan_source``, ``profiled_graphs``, ...)."""
        context = serve.get_replica_context()
        return {"replica": str(context.replica_id), "device": self.device, **self.model.report.to_dict()}


def build_app(factory: str, inputs: str, plan: str, replicas: int = 2, seed: int = 0,
              cpus_per_replica: float = 1.0, gpus_per_replica: float | None = None) -> Any:
    """The Serve application: ``replicas`` copies of ``OparaDeployment``; by default the GPUs are shared evenly."""
    if gpus_per_replica is None:
        gpus_per_replica = min(1.0, torch.cuda.device_count() / replicas) if torch.cuda.is_available() else 0.0
    options = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    plan = str(Path(plan).resolve())  # replicas may start in another working directory
    return OparaDeployment.options(num_replicas=replicas, ray_actor_options=options).bind(factory, inputs, plan,
                                                                                          seed)


def replica_reports(handle: Any, replicas: int, attempts: int = 50, timeout_s: float = 60.0) -> dict[str, dict]:
    """Each replica's report, asked until every replica answered (requests are spread at random)."""
    reports: dict[str, dict] = {}
    for _ in range(attempts):
        report = handle.report.remote().result(timeout_s=timeout_s)
        reports[report["replica"]] = report
        if len(reports) == replicas:
            break
    return reports


def _check(handle: Any, ns: argparse.Namespace) -> int:
    """Send requests, compare with the model run eagerly here, print every replica's report."""
    from opara_nb.tune import build_model, parse_inputs

    model = build_model(ns.factory, "cpu", seed=ns.seed)
    args, kwargs = parse_inputs(ns.inputs, "cpu", seed=ns.seed)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    worst = 0.0
    for _ in range(ns.requests):
        out = handle.infer.remote([a.tolist() for a in args], {k: v.tolist() for k, v in kwargs.items()})
        got = torch.as_tensor(out.result(timeout_s=120))
        worst = max(worst, (got - expected).abs().max().item())
    print(f"{ns.requests} requests, max abs difference from eager: {worst:.3g}")
    for replica, report in replica_reports(handle, ns.replicas).items():
        print(f"{replica}: {report['device']}, mode {report['mode']}, plan {report['kept']}, "
              f"{report['profiled_graphs']} graph(s) profiled; {report['plan_source']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factory", default="opara_nb.models:InceptionNet", help="module:function building the model")
    parser.add_argument("--inputs", default="randn(1,3,64,64)", help="example inputs, as for python -m opara_nb tune")
    parser.add_argument("--plan", required=True, help="the plan file (python -m opara_nb tune ... -o PLAN)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0, help="the seed the plan was tuned with (random weights)")
    parser.add_argument("--check", action="store_true", help="send --requests requests, print reports, exit")
    parser.add_argument("--requests", type=int, default=8)
    ns = parser.parse_args(argv)
    serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
    handle = serve.run(build_app(ns.factory, ns.inputs, ns.plan, ns.replicas, ns.seed), name="opara",
                       route_prefix="/")
    if ns.check:
        try:
            return _check(handle, ns)
        finally:
            serve.shutdown()
    print(f"serving on http://127.0.0.1:{ns.port}/ (POST {{\"inputs\": [...]}}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
