"""Small bundled models with the shapes of parallelism the paper targets, runnable on CPU in milliseconds."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionNet", "TinyTransformer", "GraphBreakNet", "DeepFM"]


class ConvReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        # in-place ReLU on purpose: capture must order mutations correctly across streams
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    """GoogLeNet's four-branch block: 1x1 | 1x1->3x3 | 1x1->5x5 | maxpool->1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1 = ConvReLU(cin, c1)
        self.b2 = nn.Sequential(ConvReLU(cin, c3r), ConvReLU(c3r, c3, 3))
        self.b3 = nn.Sequential(ConvReLU(cin, c5r), ConvReLU(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvReLU(cin, cp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class InceptionNet(nn.Module):
    """A miniature GoogLeNet: stem, two inception blocks, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvReLU(3, 32, 3), nn.MaxPool2d(2))
        self.block1 = InceptionBlock(32, 16, 16, 24, 8, 8, 8)
        self.block2 = InceptionBlock(56, 24, 24, 32, 8, 16, 16)
        self.fc = nn.Linear(88, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyTransformer(nn.Module):
    """One pre-norm transformer block; takes a keyword ``mask`` and returns a dict (like Hugging Face models)."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (t(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(attn)
        x = x + self.mlp(self.norm2(x))
        return {"hidden": x, "pooled": x.mean(dim=1)}


class GraphBreakNet(nn.Module):
    """Two multi-branch stages with a dynamo graph break between them: capture must keep both graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = ConvReLU(3, 8, 3), ConvReLU(3, 8, 1)
        self.b1, self.b2 = ConvReLU(16, 8, 3), ConvReLU(16, 8, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a1(x), self.a2(x)], dim=1)
        torch._dynamo.graph_break()  # a no-op in eager mode
        x = torch.cat([self.b1(x), self.b2(x)], dim=1)
        return self.fc(x.mean(dim=(2, 3)))


class DeepFM(nn.Module):
    """DeepFM (Guo et al., IJCAI'17) as benchmarked in the paper: 26 sparse fields (one embedding table each, dim 16),
    13 dense features, MLP 400-400-400. The 26 independent lookups are the parallelism."""

    def __init__(self, num_sparse: int = 26, num_dense: int = 13, vocab_size: int = 1000, dim: int = 16,
                 hidden: tuple[int, ...] = (400, 400, 400)) -> None:
        super().__init__()
        self.num_sparse, self.num_dense, self.vocab_size = num_sparse, num_dense, vocab_size
        self.embed = nn.ModuleList(nn.Embedding(vocab_size, dim) for _ in range(num_sparse))
        self.linear = nn.ModuleList(nn.Embedding(vocab_size, 1) for _ in range(num_sparse))
        self.dense_linear = nn.Linear(num_dense, 1)
        layers: list[nn.Module] = []
        width = num_sparse * dim + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        emb = torch.stack([e(sparse[:, i]) for i, e in enumerate(self.embed)], dim=1)  # (B, F, D)
        first = sum(l(sparse[:, i]) for i, l in enumerate(self.linear)) + self.dense_linear(dense)
        second = 0.5 * (emb.sum(dim=1).pow(2) - emb.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)
        deep = self.mlp(torch.cat([emb.flatten(1), dense], dim=1))
        return torch.sigmoid(first + second + deep)
