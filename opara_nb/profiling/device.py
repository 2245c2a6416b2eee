"""Device limits (SMs, threads, registers, shared memory) and roofline numbers (peak FLOP/s, bandwidth).

SM limits come from ``torch.cuda.get_device_properties`` where the attribute exists, else from a table by compute
capability. Peaks come from a small table matched by device-name substring. The ridge uses the FP32 CUDA-core peak
for float32 graphs (the classic roofline; cuDNN's TF32 convolutions would raise it) and the dense tensor-core peak for
16-bit graphs.
"""
from __future__ import annotations

import torch

from .records import DeviceInfo

__all__ = ["device_info", "PEAKS", "CPU_RIDGE"]

# name substring -> (FP32 FLOP/s, dense FP16/BF16 tensor FLOP/s, memory bytes/s); more specific names first.
PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    ("H100 PCIe", (51e12, 756e12, 2.0e12)),
    ("H100 NVL", (60e12, 835e12, 3.9e12)),
    ("H100", (67e12, 989e12, 3.35e12)),
    ("H200", (67e12, 989e12, 4.8e12)),
    ("GH200", (67e12, 989e12, 4.0e12)),
    ("A100-SXM4-80GB", (19.5e12, 312e12, 2.04e12)),
    ("A100 80GB PCIe", (19.5e12, 312e12, 1.94e12)),
    ("A100", (19.5e12, 312e12, 1.555e12)),
    ("A10G", (31.2e12, 70e12, 0.6e12)),
    ("A10", (31.2e12, 125e12, 0.6e12)),
    ("L40S", (91.6e12, 362e12, 0.864e12)),
    ("L4", (30.3e12, 121e12, 0.3e12)),
    ("V100", (15.7e12, 125e12, 0.9e12)),
    ("T4", (8.1e12, 65e12, 0.32e12)),
    ("RTX 4090", (82.6e12, 165e12, 1.008e12)),
    ("RTX 3090", (35.6e12, 71e12, 0.936e12)),
]
_GENERIC_GPU = (20e12, 150e12, 1.0e12)
CPU_RIDGE = 10.0  # FLOP/byte: a generic multi-core CPU; only used to label CPU profiles

# compute capability major.minor -> (max threads per SM, registers per SM, shared memory per SM in bytes), from the
# CUDA programming guide's table of compute capabilities. T4 (Colab's free GPU) is (7, 5): 1024 threads, 64 KiB.
_SM_LIMITS = {
    (7, 0): (2048, 65536, 98304), (7, 5): (1024, 65536, 65536), (8, 0): (2048, 65536, 167936),
    (8, 6): (1536, 65536, 102400), (8, 7): (1536, 65536, 167936), (8, 9): (1536, 65536, 102400),
    (9, 0): (2048, 65536, 233472), (10, 0): (2048, 65536, 233472), (12, 0): (1536, 65536, 102400),
}


def _peaks(name: str) -> tuple[tuple[float, float, float], str]:
    for key, peaks in PEAKS:
        if key.lower() in name.lower():
            return peaks, f"table: {key}"
    return _GENERIC_GPU, f"{name!r} is not in the device table: generic peaks assumed (ridge is approximate)"


def _table_limits(cc: tuple[int, int]) -> tuple[int, int, int]:
    """The table's limits for ``cc``, else for the newest listed capability below it (never a newer GPU's, which
    has more of everything and would make every kernel look small), else the oldest listed."""
    known = sorted(c for c in _SM_LIMITS if c <= cc)
    return _SM_LIMITS[known[-1]] if known else _SM_LIMITS[min(_SM_LIMITS)]


def _sm_limits(props: object) -> tuple[int, int, int]:
    """Threads, registers and shared memory per SM: the device's own numbers where torch reports them, else the
    table's for its compute capability."""
    fallback = _table_limits((int(getattr(props, "major", 0)), int(getattr(props, "minor", 0))))
    threads = getattr(props, "max_threads_per_multi_processor", 0) or fallback[0]
    regs = getattr(props, "regs_per_multiprocessor", 0) or fallback[1]
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or fallback[2]
    return int(threads), int(regs), int(smem)


def device_info(device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceInfo:
    """Limits and ridge point of ``device`` for graphs computing in ``dtype``."""
    if device.type != "cuda":
        return DeviceInfo(name="cpu", type=device.type, ridge=CPU_RIDGE,
                          source=f"no GPU: generic CPU ridge {CPU_RIDGE} FLOP/byte")
    props = torch.cuda.get_device_properties(device)
    (fp32, half, bandwidth), source = _peaks(props.name)
    peak = half if dtype in (torch.float16, torch.bfloat16) else fp32
    threads, regs, smem = _sm_limits(props)
    return DeviceInfo(name=props.name, type="cuda", sm_count=int(props.multi_processor_count),
                      max_threads_per_sm=threads, regs_per_sm=regs, smem_per_sm=smem, peak_flops=peak,
                      bandwidth=bandwidth, ridge=peak / bandwidth, source=source)
