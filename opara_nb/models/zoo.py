"""The paper's six models built from code or config with random weights (no downloads), when their library is here."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import OparaUsageError

__all__ = ["PAPER_MODELS", "ZooModel"]


@dataclass(frozen=True)
class ZooModel:
    """A paper model: the library (import name, also its pip name) it comes from and how to build it."""

    library: str
    build: Callable[[int], tuple[torch.nn.Module, tuple, dict]]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def build_checked(self, batch: int) -> tuple[torch.nn.Module, tuple, dict]:
        """``build(batch)``, or OparaUsageError saying which package to install when the library is missing."""
        if not self.installed():
            raise OparaUsageError(f"this model needs {self.library}, which is not installed: pip install "
                                  f"{self.library}  (bundled models need nothing: inception_block, tiny_transformer, "
                                  f"graph_break, deepfm)")
        return self.build(batch)


def _googlenet(batch: int):
    from torchvision.models import googlenet

    model = googlenet(weights=None, aux_logits=False, init_weights=False)
    return model, (torch.randn(batch, 3, 224, 224),), {}


def _inception_v3(batch: int):
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    return model, (torch.randn(batch, 3, 299, 299),), {}


def _nasnet(batch: int):
    import timm

    model = timm.create_model("nasnetalarge", pretrained=False)
    return model, (torch.randn(batch, 3, 331, 331),), {}


def _bert(batch: int, seq: int = 128):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig())  # bert-base-uncased's shape
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5(batch: int, seq: int = 128):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, vocab_size=32128)  # t5-small
    model = T5EncoderModel(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (), {"input_ids": ids}


PAPER_MODELS: dict[str, ZooModel] = {
    "googlenet": ZooModel("torchvision", _googlenet),
    "inception_v3": ZooModel("torchvision", _inception_v3),
    "nasnet": ZooModel("timm", _nasnet),
    "bert": ZooModel("transformers", _bert),
    "t5": ZooModel("transformers", _t5),
}
