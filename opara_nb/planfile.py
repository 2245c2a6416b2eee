"""Plan files: what ``optimize`` decided, written once and reused in scripts, tests and server replicas.

``om.save_plan(path)`` writes one versioned JSON file; ``optimize(model, x, plan=path)``,
``torch.compile(model, backend="opara", options={"plan": path})`` and ``python -m opara_nb tune`` use it. A module
built from a plan file profiles nothing and times no candidate: it captures the stored plan directly.

A file holds, per input signature the module captured: the inputs, the plan kept (a ``PlanSpec`` name, or
"cudagraph" for the plain CUDA graph of the model), what ``auto`` measured, and per dynamo graph (in dynamo's order)
what the graph is (placeholders, operators with their output shapes and dtypes, edges) and its plan. Besides: the
model's parameters and buffers (names, shapes, dtypes), the environment it was tuned on, and the format version.

Every mismatch is a one-line ``PlanFileError`` (an ``OparaUsageError``) naming it: another model, other inputs, a
newer format, an edited file. Plans are checked with ``Plan.check`` against the stored graph when the file is read
and against the live graph when it runs, so an edited plan is refused before it could run out of order. A file tuned
on another GPU (or torch) loads with a notice: it is valid, maybe not the fastest there.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch.utils import _pytree as pytree

from .errors import OparaUsageError
from .pipeline import PLAIN_GRAPH, PlanSpec
from .schedule import DAG, Plan

__all__ = ["FORMAT", "FORMAT_VERSION", "PlanFileError", "PlanFile", "SignatureRecord", "GraphRecord", "read",
           "read_cached", "load", "input_signature", "input_device", "environment", "graph_record",
           "model_fingerprint", "describe"]

FORMAT = "opara_nb plan"
# Bump when a field changes meaning or a reader needs something new; readers refuse newer versions.
FORMAT_VERSION = 1
_T = TypeVar("_T")
_RETUNE = ("tune again for this model and these inputs (opara_nb.optimize(model, *inputs) then om.save_plan(path), "
           "or python -m opara_nb tune)")


def is_plan_path(value: Any) -> bool:
    """Whether ``value`` can name a plan file: a non-empty str or path."""
    return isinstance(value, (str, os.PathLike)) and bool(str(value))


class PlanFileError(OparaUsageError):
    """A plan file that does not fit this model, these inputs or this opara_nb; the message says which and what to
    do."""

    # Raised inside dynamo's call of our backend: it must reach the user, not turn into "runs unscheduled".
    opara_fatal = True


# ----------------------------------------------------------------------------------------------- descriptions
def describe(value: Any) -> Any:
    """A JSON-ready description of a value's kind: "float32[1,3,224,224]" for a tensor, nested lists and dicts for
    containers, the repr of a plain number, string, bool or None, else the type's name."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(str(int(d)) for d in value.shape)}]"
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def input_signature(args: tuple, kwargs: dict) -> dict[str, Any]:
    """What a call's inputs look like (structure, shapes, dtypes, plain values), not where they live: a plan tuned
    on CUDA inputs serves CPU inputs of the same shapes too."""
    return {"args": describe(list(args)), "kwargs": describe(dict(kwargs))}


def input_device(args: tuple, kwargs: dict) -> str:
    """"cuda:N" for the first CUDA tensor among the inputs, else "cpu"."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            return str(leaf.device)
    return "cpu"


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def environment(device: str) -> dict[str, Any]:
    """Where a plan was tuned: device name, torch and CUDA versions, Python, opara_nb."""
    from . import __version__

    return {"device": _device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "opara_nb": __version__}


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The model's type and its parameters and buffers (names with shapes and dtypes); weights' values are not part of
    it (a plan fits any checkpoint of the same architecture)."""
    tensors: list[list[str]] = []
    if isinstance(model, torch.nn.Module):
        tensors = [[name, describe(t)] for name, t in [*model.named_parameters(), *model.named_buffers()]]
    return {"type": type(model).__qualname__, "tensors": tensors}


def _example_value(node: torch.fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def graph_record(g: Any, plan: Plan | None) -> GraphRecord:
    """The record of captured graph ``g`` (a ``CapturedGraph``) with ``plan`` (None: the plain CUDA graph ran)."""
    inputs = [[n.name, describe(_example_value(n))] for n in g.gm.graph.nodes if n.op == "placeholder"]
    nodes = [[n.name, n.meta.get("opara", {}).get("op", str(n.target)), describe(_example_value(n)),
              g.dag.preds(n.name)] for n in g.op_nodes()]
    return GraphRecord(inputs=inputs, nodes=nodes, plan=plan)


# ----------------------------------------------------------------------------------------------- records
@dataclass
class GraphRecord:
    """One dynamo graph: its placeholders (``[name, kind]``), its operators (``[name, op, output kind,
    [predecessors]]``, in graph order) and its plan (None when the plain CUDA graph of the model was kept).

    Names are kept for reading and for the plan, but a graph is identified by what does not depend on them
    (``canonical``): dynamo names placeholders after the caller's variables ("l_self_..." under ``torch.compile``,
    "l_model_..." under an OparaModule), so the same model may come with other names, matched by position.
    """

    inputs: list[list[Any]]
    nodes: list[list[Any]]
    plan: Plan | None

    def canonical(self) -> list[Any]:
        """Input kinds, and per operator its op, output kind and predecessors' positions."""
        position = {n[0]: i for i, n in enumerate(self.nodes)}
        return [[kind for _, kind in self.inputs], [[op, out, [position[p] for p in preds]]
                                                   for _, op, out, preds in self.nodes]]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode("utf-8")).hexdigest()

    def plan_as(self, live: GraphRecord) -> Plan | None:
        """This record's plan in the node names of ``live``, a graph with the same fingerprint."""
        if self.plan is None:
            return None
        name = {mine[0]: theirs[0] for mine, theirs in zip(self.nodes, live.nodes)}
        p = self.plan
        return Plan(streams={name[n]: s for n, s in p.streams.items()}, order=[name[n] for n in p.order],
                    syncs=[(name[u], name[v]) for u, v in p.syncs], num_streams=p.num_streams, strategy=p.strategy,
                    order_kind=p.order_kind)

    def dag(self) -> DAG:
        """The stored operator DAG (its validation names unknown and duplicate nodes and cycles)."""
        return DAG([n[0] for n in self.nodes], [(p, n[0]) for n in self.nodes for p in n[3]])

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "inputs": self.inputs, "nodes": self.nodes,
                "plan": self.plan.to_dict() if self.plan is not None else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphRecord:
        """Read and check one graph: its fingerprint matches its operators, its DAG is valid, its plan schedules it."""
        inputs, nodes = data["inputs"], data["nodes"]
        if not isinstance(inputs, list) or not isinstance(nodes, list) or \
                any(not isinstance(i, list) or len(i) != 2 for i in inputs) or \
                any(not isinstance(n, list) or len(n) != 4 or not isinstance(n[3], list) for n in nodes):
            raise ValueError("inputs and nodes must be lists ([name, kind] per input, [name, op, output, "
                             "[predecessors]] per node)")
        record = cls(inputs, nodes, Plan.from_dict(data["plan"]) if data["plan"] is not None else None)
        dag = record.dag()  # first: it names unknown, duplicate and cyclic nodes
        if data.get("fingerprint") != record.fingerprint:
            raise ValueError("its fingerprint does not match its operators")
        if record.plan is not None:
            record.plan.check(dag)
        return record


@dataclass
class SignatureRecord:
    """What the module decided for one input signature: ``kept`` plan (a ``PlanSpec`` name or "cudagraph"),
    ``mode`` ("cuda-graph", "piecewise" or "eager-plan"), what was ``requested``, ``candidates`` as ``auto``
    measured them, ``eager_ms``, the input ``device`` and one ``GraphRecord`` per dynamo graph."""

    inputs: dict[str, Any]
    device: str
    mode: str
    requested: str
    kept: str
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    eager_ms: float | None = None
    graphs: list[GraphRecord] = field(default_factory=list)

    @property
    def spec(self) -> dict[str, Any] | None:
        """The kept plan's strategy, launch order, fusion and stream cap, if any (None for the plain CUDA graph)."""
        if self.kept == PLAIN_GRAPH:
            return None
        spec = PlanSpec.parse(self.kept)
        fields = {"strategy": spec.strategy, "order": spec.order, "fused": spec.fuse}
        return {**fields, "streams": spec.streams} if spec.streams else fields

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "device": self.device, "mode": self.mode, "requested": self.requested,
                "kept": self.kept, "spec": self.spec, "candidates": self.candidates, "eager_ms": self.eager_ms,
                "graphs": [g.to_dict() for g in self.graphs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignatureRecord:
        graphs = _read_each(data["graphs"], GraphRecord.from_dict, "graph")
        record = cls(inputs=data["inputs"], device=str(data["device"]), mode=str(data["mode"]),
                     requested=str(data["requested"]), kept=str(data["kept"]), candidates=dict(data["candidates"]),
                     eager_ms=data["eager_ms"], graphs=graphs)
        if record.kept != PLAIN_GRAPH and any(g.plan is None for g in graphs):
            raise ValueError(f"plan {record.kept!r} is missing for some graph")
        if data.get("spec") != record.spec:
            raise ValueError(f"its spec {data.get('spec')} does not match the kept plan {record.kept!r}")
        if not isinstance(record.inputs, (list, dict)):
            raise ValueError(f"its inputs are {type(record.inputs).__name__}, not a description of the call")
        if not all(isinstance(v, dict) for v in record.candidates.values()):
            raise ValueError("its candidates are not measurements (name: {sync_ms, ...})")
        measured = [record.eager_ms, *(m for v in record.candidates.values() for m in v.values())]
        if not all(m is None or _is_number(m) for m in measured):  # om.report formats them as numbers
            raise ValueError("its eager_ms and candidates' measurements must be numbers (ms, MiB) or null")
        return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reason(exc: BaseException) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _read_each(items: Any, read: Callable[[Any], _T], what: str) -> list[_T]:
    """``read`` of every item; a failure says which item ("graph 2: ...")."""
    done = []
    for i, item in enumerate(items):
        try:
            done.append(read(item))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what} {i}: {_reason(exc)}") from None
    return done


# ----------------------------------------------------------------------------------------------- the file
@dataclass
class PlanFile:
    """A whole plan file: one ``SignatureRecord`` per input signature, the model's fingerprint, the environment it
    was tuned on. ``path`` is where it was read from or written to (for messages)."""

    signatures: list[SignatureRecord]
    model: dict[str, Any]
    environment: dict[str, Any]
    version: int = FORMAT_VERSION
    path: str = "<plan>"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "environment": self.environment, "model": self.model,
                "signatures": [s.to_dict() for s in self.signatures]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (a replica reading it meanwhile sees the old or the new file, never half)."""
        if not is_plan_path(path):
            raise OparaUsageError(f"save_plan needs a file path, got {path!r}")
        target = Path(path)
        if target.is_dir():
            raise OparaUsageError(f"save_plan({str(path)!r}): that is a folder; give a file path, e.g. "
                                  f"{str(target / 'model.plan.json')!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_dumps(self.to_dict()) + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # never leave the half-written file behind
            raise
        self.path = str(target)
        return target

    # ------------------------------------------------------------------------------------------ checks
    def check_model(self, model: Any) -> None:
        """Raise ``PlanFileError`` unless ``model`` has the parameters and buffers the plan was tuned with."""
        mine = model_fingerprint(model)
        here, there = mine["tensors"], self.model.get("tensors", [])
        theirs = self.model.get("type")
        kinds = "" if mine["type"] == theirs else f" ({theirs} in the file, {mine['type']} here)"
        for i, (a, b) in enumerate(zip(here, there)):
            if a != b:
                self._mismatch(kinds, f"parameter {i} is {a[0]!r} {a[1]} here, {b[0]!r} {b[1]} in the file")
        if len(here) != len(there):
            extra = here[len(there)] if len(here) > len(there) else there[len(here)]
            side = "this model has" if len(here) > len(there) else "the file's model has"
            self._mismatch(kinds, f"{side} {abs(len(here) - len(there))} more parameter(s)/buffer(s), from "
                                  f"{extra[0]!r}")

    def _mismatch(self, kinds: str, what: str) -> None:
        raise PlanFileError(f"{self.path} was tuned for another model{kinds}: {what}; {_RETUNE}")

    def match(self, args: tuple, kwargs: dict) -> SignatureRecord:
        """The record for a call with these inputs; ``PlanFileError`` naming both signatures when there is none."""
        signature = input_signature(args, kwargs)
        for record in self.signatures:
            if record.inputs == signature:
                return record
        tuned = "; ".join(_show_signature(r.inputs) for r in self.signatures)
        raise PlanFileError(f"{self.path} was tuned for inputs {tuned}, not {_show_signature(signature)}: call with "
                            f"those inputs, or {_RETUNE}")

    def plans_for(self, g: Any) -> dict[str, Plan | None]:
        """Kept plan name -> plan (None: the plain CUDA graph) of every signature that has graph ``g`` (a
        ``CapturedGraph``, found by fingerprint), each checked against ``g``'s DAG. ``PlanFileError`` naming the first
        difference from the closest stored graph when the file does not have it."""
        live = graph_record(g, None)
        found: dict[str, Plan | None] = {}
        for record in self.signatures:
            for stored in record.graphs:
                if stored.fingerprint == live.fingerprint and record.kept not in found:
                    found[record.kept] = self._checked(stored.plan_as(live), g)
        if not found:
            raise PlanFileError(f"{self.path} does not fit graph {g.index} of this model ({self._difference(live)}): "
                                f"it was tuned for another model or other inputs{self._torch_hint()}; {_RETUNE}")
        return found

    def _checked(self, plan: Plan | None, g: Any) -> Plan | None:
        if plan is not None:
            try:
                plan.check(g.dag)
            except ValueError as exc:
                raise PlanFileError(f"{self.path}: the plan of graph {g.index} does not fit it ({exc}); "
                                    f"{_RETUNE}") from None
        return plan

    def _difference(self, live: GraphRecord) -> str:
        stored = [g for r in self.signatures for g in r.graphs]
        if not stored:
            return "the file has no graph"
        closest = max(stored, key=lambda s: _common_prefix(live, s))
        pairs = (("input", live.inputs, closest.inputs, 0), ("operator", live.nodes, closest.nodes, 1))
        for kind, mine, theirs, part in pairs:
            same = [a == b for a, b in zip(live.canonical()[part], closest.canonical()[part])]
            if not all(same):
                i = same.index(False)
                return f"{kind} {i} is {_show_item(mine[i])} here, {_show_item(theirs[i])} in the file"
            if len(mine) != len(theirs):
                return f"{len(mine)} {kind}s here, {len(theirs)} in the file"
        return "the same operators in another order"

    def _torch_hint(self) -> str:
        tuned = self.environment.get("torch")
        return "" if tuned == torch.__version__ else \
            f" (tuned with torch {tuned}, this is {torch.__version__}: dynamo may trace the model differently)"

    def notice(self, device: str) -> str | None:
        """A line when this file was tuned on another device or torch than this run (valid, maybe not the
        fastest), else None."""
        here = {"device": _device_name(device), "torch": torch.__version__}
        differs = [f"{k} {self.environment.get(k)!r} (here {v!r})" for k, v in here.items()
                   if self.environment.get(k) != v]
        if not differs:
            return None
        return (f"opara_nb: {self.path} was tuned with {', '.join(differs)}: the plan is valid here, maybe not the "
                "fastest; tune again on this machine for the best one")

    def source_line(self, record: SignatureRecord) -> str:
        """For the report: where the plan came from and what tuning measured."""
        tuned = f"tuned with {record.requested or record.kept} on {self.environment.get('device')}, torch " \
                f"{self.environment.get('torch')}: kept {record.kept}"
        kept = record.candidates.get(record.kept, {}).get("sync_ms")
        plain = record.candidates.get(PLAIN_GRAPH, {}).get("sync_ms")
        if kept is not None and plain is not None and record.kept != PLAIN_GRAPH:
            tuned += f", {kept:.3f} ms vs {plain:.3f} ms for a plain CUDA graph"
        return f"plan loaded from {self.path} ({tuned}); not profiled, no candidates timed"


def _dumps(value: Any, level: int = 0) -> str:
    """JSON with one line per operator, sync and parameter: diffable, and readable without a viewer."""
    pad = " " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [pad + (_dumps(v, level + 1) if isinstance(v, dict) else json.dumps(v)) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * level + "]"
    return json.dumps(value)


def _common_prefix(a: GraphRecord, b: GraphRecord) -> int:
    n = 0
    ca, cb = a.canonical(), b.canonical()
    for x, y in zip(ca[0] + ca[1], cb[0] + cb[1]):
        if x != y:
            break
        n += 1
    return n


def _show_item(item: list) -> str:
    if len(item) == 2:
        return f"{item[0]!r} {item[1]}"
    return f"{item[0]!r} ({item[1]} -> {item[2]}, after {', '.join(item[3]) or 'nothing'})"


def _show_signature(signature: Mapping[str, Any]) -> str:
    parts = [str(a) for a in signature.get("args", [])]
    parts += [f"{k}={v}" for k, v in signature.get("kwargs", {}).items()]
    return "(" + ", ".join(parts) + ")"


# ----------------------------------------------------------------------------------------------- reading
def read(path: str | os.PathLike) -> PlanFile:
    """Read and check the plan file at ``path``; ``PlanFileError`` says what is wrong with it and what to do."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"cannot read plan file {where} ({exc.strerror or exc}): write one with "
                            "om.save_plan(path) or python -m opara_nb tune") from None
    except UnicodeDecodeError:  # a binary or otherwise encoded file: plan files are UTF-8 JSON text
        raise PlanFileError(f"{where} is not a plan file (not JSON text: it is not UTF-8); give the path of a file "
                            "from om.save_plan(path) or python -m opara_nb tune") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{where} is not a plan file (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanFileError(f"{where} is not an opara_nb plan file (no \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PlanFileError(f"{where} has no valid format version ({version!r}); {_RETUNE}")
    if version > FORMAT_VERSION:
        raise PlanFileError(f"{where} was written by a newer opara_nb (plan format {version}; this one reads up to "
                            f"{FORMAT_VERSION}): upgrade opara_nb, or {_RETUNE}")
    try:
        signatures = _read_each(data["signatures"], SignatureRecord.from_dict, "signature")
        if not signatures:
            raise ValueError("it holds no plan")
        model = dict(data["model"])
        tensors = model.get("tensors", [])
        if not isinstance(tensors, list) or not all(isinstance(t, list) and len(t) >= 2 for t in tensors):
            raise ValueError("its model section does not list parameters as [name, shape and dtype]")
        return PlanFile(signatures, model, dict(data["environment"]), version, where)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFileError(f"{where} is damaged or was edited ({_reason(exc)}); {_RETUNE}") from None


def read_cached(path: str | os.PathLike) -> PlanFile:
    """``read(path)``, read again only when the file changed (the torch.compile backend asks once per graph)."""
    try:
        stat = os.stat(path)
    except OSError:
        return read(path)  # says why it cannot be read
    return _read_version(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_version(path: str, mtime_ns: int, size: int) -> PlanFile:
    return read(path)


def load(plan: str | os.PathLike | PlanFile) -> PlanFile:
    """``plan`` itself when it is already read, else ``read(plan)``."""
    return plan if isinstance(plan, PlanFile) else read(plan)
