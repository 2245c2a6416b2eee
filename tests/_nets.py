"""Small models the runtime tests share."""
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
