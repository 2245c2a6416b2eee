"""Serving at scale: a local Ray cluster on the CPU (loopback only) runs ``examples/serve_ray.py`` with two replicas
that load one plan file; requests match eager, and no replica profiled or timed anything.

Ray Serve is the optional extra ``serve`` (also in ``dev``, which the README's test command installs)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install -e '.[serve]' (or '.[dev]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[serve]'")

ROOT = Path(__file__).resolve().parents[1]
FACTORY, INPUTS = "opara_nb.models:InceptionNet", "randn(2,3,32,32)"
TIME_LIMIT_S = 600  # the whole test: a hung cluster fails it instead of the CI job


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in this (main) thread after ``seconds``, wherever it is waiting."""
    def expire(signum, frame):
        raise TimeoutError(f"the Ray Serve test took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example():
    # Registered under its own name, with examples/ on the replicas' path, so Ray imports it there by name.
    spec = importlib.util.spec_from_file_location("serve_ray", ROOT / "examples" / "serve_ray.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_ray"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plan_file(tmp_path):
    """Tuned here, once (on the CPU: the plan runs eagerly on the replicas, with the same outputs)."""
    from opara_nb.runtime import optimize
    from opara_nb.tune import build_model, parse_inputs

    model = build_model(FACTORY, seed=0)
    args, kwargs = parse_inputs(INPUTS, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = optimize(model, *args, strategy="opara", **kwargs)
    return om.save_plan(tmp_path / "plan.json"), model, args


def test_two_replicas_serve_from_one_plan_file_without_profiling(plan_file):
    path, model, args = plan_file
    example = _example()
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])
    port = _free_port()
    with time_limit(TIME_LIMIT_S):
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            handle = serve.run(example.build_app(FACTORY, INPUTS, str(path), replicas=2, cpus_per_replica=0.5,
                                                 gpus_per_replica=0), name="opara", route_prefix="/")
            with torch.no_grad():
                expected = model(*args)
            for _ in range(6):
                got = handle.infer.remote([a.tolist() for a in args]).result(timeout_s=120)
                torch.testing.assert_close(torch.tensor(got), expected)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", method="POST",
                                             data=json.dumps({"inputs": [a.tolist() for a in args]}).encode())
            with urllib.request.urlopen(request, timeout=120) as response:
                torch.testing.assert_close(torch.tensor(json.load(response)["outputs"]), expected)
            reports = example.replica_reports(handle, replicas=2)
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    assert len(reports) == 2, f"expected reports from two replicas, got {list(reports)}"
    for report in reports.values():
        assert report["device"] == "cpu" and report["kept"] == "opara"
        assert report["profiled_graphs"] == 0 and report["profile_ms"] == 0.0
        assert report["plan_source"].startswith(f"plan loaded from {path}")
