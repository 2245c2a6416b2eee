"""What several test files share: small models and plan lookups."""
from __future__ import annotations

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


def stream_nodes(plan, stream: int) -> list[str]:
    """The nodes ``plan`` puts on ``stream``, in launch order."""
    return [n for n in plan.order if plan.streams[n] == stream]


def waits(plan, node: str) -> list[str]:
    """The nodes whose events ``node`` waits for (the u of every sync ``(u, node)``)."""
    return [u for u, v in plan.syncs if v == node]
