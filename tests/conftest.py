"""Shared fixtures; tests marked ``cuda`` skip without a CUDA GPU (run them on the GPU machine)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Profiles are cached per user; tests get their own cache directory."""
    monkeypatch.setenv("OPARA_NB_CACHE_DIR", str(tmp_path / "opara-cache"))
