"""What several test files share: small models, plan lookups and a faked CUDA graph capture."""
from __future__ import annotations

import torch
from torch import nn


class ItemNet(nn.Module):
    """Uses .item(): a host sync that dynamo breaks the graph on and a CUDA graph cannot capture."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return y / (y.abs().max().item() + 1.0)


class _Replay:
    """A 'CUDA graph' that replays by running the captured call again into its static outputs."""

    def __init__(self, call) -> None:
        self.call = call

    def replay(self) -> None:
        out = torch.utils._pytree.tree_leaves(self.call._call_static())
        for dst, src in zip(self.call._out_leaves, out):
            dst.copy_(src)

    def reset(self) -> None:
        pass


def fake_graph_capture(monkeypatch, fail=lambda: False) -> None:
    """Make ``GraphedCall`` work on the CPU: no warm-up, and a capture that runs once (or raises while ``fail()``)."""
    from opara_nb.runtime import cudagraph

    def capture(self):
        if fail():
            raise RuntimeError("operation not permitted when stream is capturing")
        self.graph = _Replay(self)
        self._out_leaves, self._out_spec = torch.utils._pytree.tree_flatten(self._call_static())
        self._single_out = self._out_spec.is_leaf()

    monkeypatch.setattr(cudagraph.GraphedCall, "warm_up", lambda self: None)
    monkeypatch.setattr(cudagraph.GraphedCall, "capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def stream_nodes(plan, stream: int) -> list[str]:
    """The nodes ``plan`` puts on ``stream``, in launch order."""
    return [n for n in plan.order if plan.streams[n] == stream]


def waits(plan, node: str) -> list[str]:
    """The nodes whose events ``node`` waits for (the u of every sync ``(u, node)``)."""
    return [u for u, v in plan.syncs if v == node]
