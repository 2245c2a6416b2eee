"""The profile records: per kernel, per node, per device, per graph. Plain dataclasses that round-trip to JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["KernelInfo", "NodeProfile", "DeviceInfo", "GraphProfile", "NO_GPU_NOTE", "scale_text"]

NO_GPU_NOTE = "made without GPU resource data (no CUDA): times are CPU op times, demands are 0"


def scale_text(factor: float) -> str:
    """A scale factor to two decimals, or three where two would read as "1.00" (a factor that did change times)."""
    text = f"{factor:.2f}"
    return f"{factor:.3f}" if text == "1.00" else text


def _from_dict(cls: type, data: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class KernelInfo:
    """One GPU activity (kernel, memcpy or memset) attributed to a node."""

    name: str
    duration_ms: float
    grid: tuple = (0, 0, 0)
    block: tuple = (0, 0, 0)
    registers: int = 0          # per thread
    shared_mem: int = 0         # bytes per block, static + dynamic
    occupancy: float | None = None   # "est. achieved occupancy %" from the trace, when present
    kind: str = "kernel"        # "kernel" | "memcpy" | "memset"
    stream: int | None = None
    start_us: float | None = None    # trace timestamp of the start (for measured timelines)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelInfo":
        k = _from_dict(cls, data)
        k.grid, k.block = tuple(k.grid), tuple(k.block)
        return k


@dataclass
class NodeProfile:
    """What one fx node costs. ``time_ms`` is GPU kernel time with CUDA, CPU op time without.

    ``kind`` is "compute" or "memory" (arithmetic intensity against the ridge point) or "none" for nodes that do
    no work of their own (views, getitem, nodes that launch no kernel); "none" nodes are not memory-bound and have
    demand 0, so launch ordering never holds anything back for them.
    """

    name: str
    op: str = ""
    module: str = ""
    kernels: list[KernelInfo] = field(default_factory=list)
    time_ms: float = 0.0
    cpu_ms: float = 0.0
    flops: int = 0
    bytes: int = 0
    intensity: float = 0.0
    memory_bound: bool = False
    kind: str = "none"
    demand: float = 0.0         # fraction of the GPU (occupancy model), max over the node's kernels
    demand_smem: float = 0.0    # paper prototype: shared memory per block in bytes, max over kernels

    @property
    def kernel_ms(self) -> float:
        return sum(k.duration_ms for k in self.kernels)

    def main_kernel(self) -> KernelInfo | None:
        """The node's longest kernel (the one tables show grid/block for)."""
        kernels = [k for k in self.kernels if k.kind == "kernel"] or self.kernels
        return max(kernels, key=lambda k: k.duration_ms, default=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NodeProfile":
        node = _from_dict(cls, data)
        node.kernels = [KernelInfo.from_dict(k) for k in data.get("kernels", [])]
        return node


@dataclass
class DeviceInfo:
    """Device limits used by the demand model and the roofline ridge point; ``source`` says where they came from."""

    name: str = "cpu"
    type: str = "cpu"
    sm_count: int = 0
    max_threads_per_sm: int = 0
    regs_per_sm: int = 0
    smem_per_sm: int = 0
    peak_flops: float = 0.0     # FLOP/s used for the ridge point
    bandwidth: float = 0.0      # bytes/s
    ridge: float = 0.0          # FLOP per byte
    source: str = ""

    to_dict = asdict

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceInfo":
        return _from_dict(cls, data)


@dataclass
class GraphProfile:
    """The profile of one captured graph: ``nodes`` by fx node name, in graph order."""

    nodes: dict[str, NodeProfile]
    device: DeviceInfo
    has_gpu_data: bool = False
    demand_kind: str = "occupancy"
    critical_path_ms: float = 0.0
    total_kernel_ms: float = 0.0
    profiler_kernel_ms: float | None = None   # all GPU activity the profiler saw (checks attribution)
    unattributed: int = 0                     # GPU activities that matched no node
    warning: str | None = None
    note: str = ""
    index: int = 0
    from_cache: bool = False
    measured_at: str = ""                     # when the numbers were measured (UTC), shown for cached profiles
    wall_ms: float | None = None              # one plain run of the whole graph: what node times are checked against
    time_scale: float = 1.0                   # factor applied to every node's time (see time_method)
    time_method: str = ""                     # how the node times were measured and checked, in one line
    times_reliable: bool = True               # False: the node times disagree with the measured run; read with care

    def times_caption(self) -> str:
        """What the times are, for table headers and picture titles: "GPU kernel times", "CPU times, scaled x0.84
        to the measured run", or "... unreliable"."""
        what = "GPU kernel times" if self.has_gpu_data else "CPU times"
        if self.time_scale != 1.0:
            what += f", scaled x{scale_text(self.time_scale)} to the measured run"
        return what + ("" if self.times_reliable else " (unreliable)")

    def demands(self, kind: str | None = None) -> dict[str, float]:
        """Per-node demand for ``launch_order``: "occupancy" (fraction of the GPU) or "smem" (paper prototype)."""
        kind = kind or self.demand_kind
        if kind not in ("occupancy", "smem"):
            raise ValueError(f"demand kind must be 'occupancy' or 'smem', got {kind!r}")
        attr = "demand" if kind == "occupancy" else "demand_smem"
        return {name: getattr(node, attr) for name, node in self.nodes.items()}

    def memory_bound_nodes(self) -> set[str]:
        return {name for name, node in self.nodes.items() if node.memory_bound}

    def slowest(self, top: int | None = None) -> list[NodeProfile]:
        """The nodes by time, slowest first (the ``top`` slowest when given)."""
        return sorted(self.nodes.values(), key=lambda p: -(p.time_ms or 0.0))[:top]

    def fusible_nodes(self) -> set[str]:
        """Nodes with no counted FLOPs (no matmul, convolution or attention): TorchInductor generates their code
        itself and fuses them with their neighbours, where the others call a library kernel."""
        return {name for name, node in self.nodes.items() if node.flops == 0}

    def times(self) -> dict[str, float]:
        """Per-node time (ms): GPU kernel time with CUDA, CPU op time without."""
        return {name: node.time_ms for name, node in self.nodes.items()}

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("nodes", "device")}
        data["device"] = self.device.to_dict()
        data["nodes"] = [n.to_dict() for n in self.nodes.values()]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GraphProfile":
        fields = {k: v for k, v in data.items() if k not in ("nodes", "device")}
        gp = _from_dict(cls, fields | {"nodes": {}, "device": None})
        gp.device = DeviceInfo.from_dict(data["device"])
        gp.nodes = {n["name"]: NodeProfile.from_dict(n) for n in data["nodes"]}
        return gp
