"""Shared fixtures: tiny synthetic datasets on disk, an isolated torchvision cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dr_resnet.data.synthetic import generate

from helpers import preprocessed_dataset, train_run


def pytest_collection_modifyitems(config, items):
    """The GPU tier (marker gpu) is collected everywhere and skipped, with one reason, without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: the GPU tier (pytest -m gpu) runs with `make gpu-check` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A lab-format synthetic dataset: 30 train, 12 test images, 80 px canvases."""
    return generate(tmp_path_factory.mktemp("synthetic") / "lab", {"train": 30, "test": 12}, seed=3,
                    fmt="lab", size=80, progress=False)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, with downloads pointed at a closed local port so they fail at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    return tmp_path / "torch_home"


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Raw synthetic photos (72 px canvases of varying shape, black borders) in base/'raw' and their
    preprocessed 48 px copies in base/'data'; 40 train, 24 test."""
    base = tmp_path_factory.mktemp("photos")
    preprocessed_dataset(base, 40, 24, seed=5, size=48)
    return base


@pytest.fixture(scope="session")
def runs(photos, tmp_path_factory) -> dict[str, Path]:
    """A trained run directory per head (3 epochs on `photos`), for the predict and export tests."""
    base = tmp_path_factory.mktemp("runs")
    return {"classification": train_run(photos / "data", base / "cls"),
            "regression": train_run(photos / "data", base / "reg", "model.head=regression", "train.clip_grad_norm=1.0"),
            "ordinal": train_run(photos / "data", base / "ord", "model.head=ordinal")}
