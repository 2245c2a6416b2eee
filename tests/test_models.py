"""Bundled models (shapes, eval mode, seeded determinism), get() errors, and the zoo's builds (mocked libraries)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from opara_nb.errors import OparaUsageError
from opara_nb.models import DeepFM, available, get, names, zoo

BUNDLED = ["inception_block", "tiny_transformer", "graph_break", "deepfm"]


def _leaves(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_build_in_eval_mode_and_keep_the_batch(name):
    model, args, kwargs = get(name, batch=3)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert all(t.shape[0] == 3 and torch.isfinite(t).all() for t in _leaves(out))


@pytest.mark.parametrize("name", BUNDLED)
def test_same_seed_same_model_and_inputs_and_caller_rng_untouched(name):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    m1, a1, k1 = get(name, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # get() restored the caller's RNG state
    m2, a2, k2 = get(name, seed=7)
    m3, _, _ = get(name, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    p1, p2, p3 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(_leaves(m1(*a1, **k1)), _leaves(m2(*a2, **k2))))


def test_deepfm_has_the_papers_shape():
    model, (sparse, dense), _ = get("deepfm", batch=2)
    assert isinstance(model, DeepFM) and sparse.shape == (2, 26) and dense.shape == (2, 13)
    assert len(model.embed) == 26 and all(e.embedding_dim == 16 for e in model.embed)
    widths = [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [400, 400, 400, 1] and model.mlp[0].in_features == 26 * 16 + 13
    assert int(sparse.max()) < model.vocab_size


def test_get_rejects_unknown_names_and_bad_batches():
    with pytest.raises(OparaUsageError, match="inception_block.*googlenet"):
        get("resnet9000")
    with pytest.raises(OparaUsageError, match="batch"):
        get("deepfm", batch=0)
    assert names()[:4] == BUNDLED and set(BUNDLED) <= set(available())


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    for name, package in [("googlenet", "torchvision"), ("nasnet", "timm"), ("t5", "transformers")]:
        with pytest.raises(OparaUsageError, match=f"pip install {package}"):
            get(name)
    assert "bert" not in available()


def _fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec needs a spec for modules in sys.modules
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


class _Recorder(torch.nn.Module):
    """Stands in for a library model: remembers how it was built."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.built_with = (args, kwargs)
        self.config = types.SimpleNamespace(vocab_size=30522)
        self.lin = torch.nn.Linear(1, 1)


def test_zoo_builds_with_random_weights_and_paper_inputs(monkeypatch):
    """Library calls are mocked: they must ask for no pretrained weights and get the paper's input sizes."""
    tv = _fake_module(monkeypatch, "torchvision")
    tv.models = _fake_module(monkeypatch, "torchvision.models", googlenet=_Recorder, inception_v3=_Recorder)
    _fake_module(monkeypatch, "timm", create_model=_Recorder)
    _fake_module(monkeypatch, "transformers", BertConfig=lambda: "bert-config", BertModel=_Recorder,
                 T5Config=lambda **kw: types.SimpleNamespace(**kw), T5EncoderModel=_Recorder)
    m, (x,), _ = get("googlenet", batch=2)
    assert m.built_with[1]["weights"] is None and x.shape == (2, 3, 224, 224)
    m, (x,), _ = get("inception_v3")
    assert m.built_with[1]["weights"] is None and x.shape == (1, 3, 299, 299)
    m, (x,), _ = get("nasnet")
    assert m.built_with == (("nasnetalarge",), {"pretrained": False}) and x.shape == (1, 3, 331, 331)
    m, args, kw = get("bert", batch=2)
    assert m.built_with[0] == ("bert-config",) and kw["input_ids"].shape == (2, 128) == kw["attention_mask"].shape
    m, args, kw = get("t5")
    config = m.built_with[0][0]
    assert (config.d_model, config.num_layers, config.num_heads) == (512, 6, 8) and kw["input_ids"].shape == (1, 128)
    assert not m.training


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_real_torchvision_models_when_installed(name):
    pytest.importorskip("torchvision")
    model, args, kwargs = get(name)
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert out.shape == (1, 1000)


@pytest.mark.cuda
@pytest.mark.parametrize("name, library", [("googlenet", "torchvision"), ("inception_v3", "torchvision"),
                                           ("nasnet", "timm"), ("bert", "transformers"), ("t5", "transformers"),
                                           ("deepfm", "torch")])
def test_paper_models_run_on_cuda(name, library):
    pytest.importorskip(library)
    model, args, kwargs = get(name, device="cuda")
    with torch.no_grad():
        out = model(*args, **kwargs)
    first = out if isinstance(out, torch.Tensor) else out[0]
    assert first.is_cuda and first.shape[0] == 1 and torch.isfinite(first).all()
