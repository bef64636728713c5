"""Shared fixtures: tiny synthetic datasets on disk, an isolated torchvision cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dr_resnet import checkpoint
from dr_resnet.preprocess import Settings, preprocess
from dr_resnet.synthetic import generate


def preprocessed_dataset(base: Path, train: int, test: int, seed: int, size: int) -> Path:
    """A lab-format synthetic dataset generated at 1.5 x size, preprocessed to size px: base / 'data'."""
    raw = generate(base / "raw", {"train": train, "test": test}, seed=seed, size=size * 3 // 2, progress=False)
    preprocess(raw, base / "data", Settings(size=size), progress=False)
    return base / "data"


TIMING_KEYS = {"images_per_s", "train_seconds", "eval_seconds", "epoch_seconds"}


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two run directories whose last checkpoints and metrics (timings aside) are equal, bit for bit."""
    sa, sb = checkpoint.load(a / "checkpoint_last.pt"), checkpoint.load(b / "checkpoint_last.pt")
    assert sa["epoch"] == sb["epoch"] and sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for ma, mb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ma["momentum_buffer"], mb["momentum_buffer"])
    assert without_timing(metrics_rows(a)) == without_timing(metrics_rows(b))


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


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Raw synthetic photos (72 px canvases of varying shape, black borders) in base/'raw' and their
    preprocessed 48 px copies in base/'data'; 40 train, 24 test."""
    base = tmp_path_factory.mktemp("photos")
    preprocessed_dataset(base, 40, 24, seed=5, size=48)
    return base


def demo_args(data: Path, run_dir: Path, *extra: str, batch_size: int = 8, epochs: int = 2, workers: int = 1) -> list[str]:
    """dr_resnet.train's arguments: the demo recipe on a 48 px test dataset, on CPU (gloo also on a GPU
    machine: tests compare runs bit for bit and start several processes); `extra` overrides come last."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=48",
            f"train.batch_size={batch_size}", f"train.epochs={epochs}", f"data.workers={workers}", "train.lr=0.02",
            "train.device=cpu", f"output.dir={run_dir}", *extra]


def train_run(data: Path, run_dir: Path, *extra: str) -> Path:
    """3 epochs on `data`: a barely trained model for the serving tests, which need outputs that differ
    from photo to photo. On 40 images the fair recipe's gentle start (zero-init residuals) leaves every
    photo at one grade after 3 epochs; without it, and with every grade equally likely
    (train.sampler=balanced), the grades move."""
    from dr_resnet.train import main

    assert main(demo_args(data, run_dir, "train.sampler=balanced", "model.zero_init_residual=false", *extra,
                          epochs=3, workers=0)) == 0
    return run_dir


@pytest.fixture(scope="session")
def runs(photos, tmp_path_factory) -> dict[str, Path]:
    """A trained run directory per head (3 epochs on `photos`), for the predict and export tests."""
    base = tmp_path_factory.mktemp("runs")
    return {"classification": train_run(photos / "data", base / "cls"),
            "regression": train_run(photos / "data", base / "reg", "model.head=regression", "train.clip_grad_norm=1.0"),
            "ordinal": train_run(photos / "data", base / "ord", "model.head=ordinal")}
