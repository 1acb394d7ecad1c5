"""Shared fixtures. Everything runs offline on CPU and writes only under pytest's tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from croft_search.backbones import load_backbone
from croft_search.data import build_digits


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the embedded digits benchmark (seed 0), built once per session.
    Treat it as read-only: other tests share it."""
    root = tmp_path_factory.mktemp("digits-data")
    build_digits(root, seed=0)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Method tests run tiny matrix products: intra-op threads only wait for each other there,
    and on a loaded 2-core machine two threads made text-encoder steps ~25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny CLIP's checkpoint, for searches that need a checkpoint path."""
    path = tmp_path_factory.mktemp("weights") / "random-tiny.pt"
    torch.save(load_backbone("tiny-digits", pretrained=None).model.state_dict(), path)
    return path
