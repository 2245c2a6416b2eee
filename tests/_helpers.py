"""What several test files share: small models and plan lookups."""
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


def stream_nodes(plan, stream: int) -> list[str]:
    """The nodes ``plan`` puts on ``stream``, in launch order."""
    return [n for n in plan.order if plan.streams[n] == stream]


def waits(plan, node: str) -> list[str]:
    """The nodes whose events ``node`` waits for (the u of every sync ``(u, node)``)."""
    return [u for u, v in plan.syncs if v == node]


class BranchNet(nn.Module):
    """Conv + BatchNorm, then two branches that can run on two streams, then a head; ``scale`` is an optional
    (CPU-scalar) argument."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, width, 1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x, scale=None):
        y = torch.relu(self.bn(self.conv(x)))
        z = torch.cat([self.a(y).mean((2, 3)), self.b(y).mean((2, 3))], 1)
        out = self.head(z)
        return out * scale if scale is not None else out


class Outputs(nn.Module):
    """Outputs that share memory with each other or with the input, in the ways a model can return them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin, self.kind = nn.Linear(4, 4), kind

    def forward(self, x):
        y = self.lin(x).relu()
        return {"twice": lambda: (y, y), "dict twice": lambda: {"a": y, "b": [y]},
                "base and view": lambda: (y, y.view(-1)), "two slices": lambda: (y[0], y[1]),
                "input": lambda: (x, y), "view of input": lambda: (x[0], y)}[self.kind]()


class Counting(nn.Module):
    """A forward with Python side effects: a counter and a list of the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls, self.seen = 0, []

    def forward(self, x):
        self.calls += 1
        self.seen.append(x.shape[0])
        return self.lin(x)


class Block(nn.Module):
    """A block whose forward reads plain settings: a graph bakes them in as constants."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.alpha, self.residual, self.mode = 0.5, True, "sum"

    def forward(self, x):
        return self._combine(x, self.lin(x) * self.alpha)

    def _combine(self, x, y):  # reached from forward: its reads count too
        if not self.residual:
            return y
        return x + y if self.mode == "sum" else x * y


class Config:
    """A settings object shared by every layer, like a Hugging Face config: plain fields, and a property over two."""

    def __init__(self) -> None:
        self.double_output, self.return_dict, self.torchscript = False, True, False
        self.unused = 1

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.torchscript


class Layer(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config, self.lin = config, nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if self.config.double_output else y


class Configured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = Config()
        self.layers = nn.Sequential(Layer(self.config), Layer(self.config))

    def forward(self, x):
        y = self.layers(x)
        return {"y": y} if self.config.use_return_dict else (y,)


class CountsCalls(nn.Module):
    """A buffer the forward advances, and the input it writes: planning must leave both as they were."""

    def __init__(self, rebind: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.rebind = rebind
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        if self.rebind:
            self.n = self.n + 1  # a new tensor under the buffer's name
        else:
            self.n += 1
        x.add_(1)
        return self.lin(x) * self.n


def run_threads(work, n: int) -> list:
    """Run ``work(i)`` for i in range(n) on n threads at once; the exceptions they raised."""
    import threading

    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as exc:  # noqa: BLE001 - collected for the test to assert on
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


class Box:
    """An argument pytree does not open, equal by name: a replay keyed by it would serve another call's tensor."""

    def __init__(self, name, t):
        self.name, self.t = name, t

    def __eq__(self, other):
        return isinstance(other, Box) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


class ReadsABox(nn.Module):
    def forward(self, x, box):
        return x + box.t


class ViewsOfEachOther(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        y = self.lin(x)
        return y, y[:, :3], y


class ReturnsItsOwn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("buf", torch.zeros(4))

    def forward(self, x):
        return self.lin(x), self.lin.weight, self.buf, self.lin.weight[0]


class Steps:
    def __init__(self) -> None:
        self.step = 0


class Stepping(nn.Module):
    """A forward that reads a field of a plain object and advances it: a replay would skip the update, and the field
    would look changed to the guard on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.state = nn.Linear(4, 4), Steps()

    def forward(self, x):
        y = self.lin(x) * (1.0 + self.state.step)
        self.state.step = self.state.step + 1
        return y


class Encoder(nn.Module):
    """A module whose model is a bound method (``encode``) calling a helper that reads a class setting."""

    alpha = 2.0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def helper(self, y):
        return y * self.alpha

    def encode(self, x):
        return self.helper(self.lin(x))


class ReadsContainers(nn.Module):
    """Reads nested plain containers, a tuple holding a list, a list of tensors and a large list."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cfg = {"act": {"slope": 0.1}}
        self.pair = ([1.0, 2.0],)
        self.rows = [[1.0], [2.0]]
        self.scales = [torch.tensor(2.0), torch.tensor(3.0)]
        self.table = list(range(100))

    def forward(self, x):
        y = self.lin(x) * self.cfg["act"]["slope"] + self.pair[0][1] + self.rows[1][0]
        return y * self.scales[1] + self.table[5]


class HeldBuffer(nn.Module):
    """A result returned as a small module made per call, holding the call's tensor as a buffer."""

    def __init__(self, t):
        super().__init__()
        self.register_buffer("t", t)


class SelfCopy:
    """A result whose ``__deepcopy__`` returns itself ("immutable, no need to copy")."""

    def __init__(self, t):
        self.t = t

    def __deepcopy__(self, memo):
        return self


class WrapsOutput(nn.Module):
    """Returns ``wrap(y)`` for the call's tensor ``y``: an output object of the caller's choosing."""

    def __init__(self, wrap, width: int = 4):
        super().__init__()
        self.lin, self.wrap = nn.Linear(width, width), wrap

    def forward(self, x):
        return self.wrap(self.lin(x).relu())


class SquareWeight(nn.Module):
    """``x @ w`` with a square weight: ``w.t_()`` changes its layout in place, not its shape."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width), requires_grad=False)

    def forward(self, x):
        return x @ self.w


class ResizesInput(nn.Module):
    """Changes its input's layout in place (``how``: "resize" trims a preallocated buffer, "set", "t"), then a
    linear."""

    def __init__(self, how: str = "resize", width: int = 4):
        super().__init__()
        self.lin, self.how = nn.Linear(width, width), how

    def forward(self, x):
        if self.how == "resize":
            x.resize_(2, x.shape[1])
        elif self.how == "set":
            x.set_(x[:2].clone())
        else:
            x.t_()
        return self.lin(x)
