"""A trained model ready to grade photos, whatever form it comes in: a training checkpoint (PyTorch), or
a file dr_resnet.export wrote (ONNX, TorchScript). Each gives its recipe (what photos go through first,
see recipe.py), its head and `grade(images, tta)`: uint8 images in, grades, what the head reports
(grade probabilities, or the regression score) and the referable-DR score out.

GradingModel is the one module that turns uint8 images into those three: normalisation, the network and
the head's decoding. export writes it; predict runs it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dr_resnet.data.recipe import Recipe
from dr_resnet.errors import UserError
from dr_resnet.model.heads import Head, build_head
from dr_resnet.results.rundir import missing_checkpoint, pruned_note
from dr_resnet.training import components
from dr_resnet.training.loop import TTA_MODES, _views
from dr_resnet.training.runtime import Precision

ONNX_SUFFIX, TORCHSCRIPT_SUFFIX = ".onnx", ".ts"
METADATA_KEY = "dr_resnet"  # the JSON an exported file carries: recipe, head, model card
OUTPUT_NAMES = ("grade", "values", "referable_score")


class GradingModel(nn.Module):
    """uint8 RGB (N, 3, S, S) -> grades (N,) int64, values ((N, 5) grade probabilities, or the (N,)
    regression score) and the referable-DR score (N,). `grade` with tta="flips" averages the head's
    outputs over the image and its flips first, as evaluation does."""

    def __init__(self, network: nn.Module, head: Head, recipe: Recipe) -> None:
        super().__init__()
        self.network, self.head = network, head
        self.register_buffer("mean", torch.tensor(recipe.mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(recipe.std).view(1, -1, 1, 1) * 255)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std  # as augment.normalize: the same numbers

    def aggregated(self, images: Tensor, tta: str = "none") -> Tensor:
        return self.head.aggregate([self.network(v) for v in _views(self.normalize(images), tta)])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        aggregated = self.aggregated(images)
        return self.head.predict(aggregated), self.head.values(aggregated), self.head.referable_score(aggregated)


@dataclass(frozen=True)
class Graded:
    """A batch's grades, what the head reports (probabilities or score) and referable-DR scores, on the host."""

    grades: np.ndarray
    values: np.ndarray
    referable: np.ndarray


class ModelLoadError(UserError, ValueError):
    """A file that is no usable dr_resnet model; the message names it and why."""


class Grader:
    """What predict needs of a model: its recipe, head (kind and state), where it runs, and grade()."""

    recipe: Recipe
    head_kind: str
    head_state: dict
    source: str  # "checkpoint", "onnx" or "torchscript"
    device: torch.device = torch.device("cpu")
    network: nn.Module | None = None  # the PyTorch network (checkpoints only: heat maps need it)

    def grade(self, images: Tensor, tta: str = "none") -> Graded:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.source} model, {self.head_kind} head, {self.recipe.image_size} px"


class CheckpointGrader(Grader):
    """A training checkpoint, run by PyTorch on `device` (autocast as evaluation: bf16 on recent GPUs)."""

    source = "checkpoint"

    def __init__(self, path: str | os.PathLike, device: torch.device, amp: str = "auto") -> None:
        trained = components.trained_model(path, device, amp)
        state, cfg = trained.state, trained.cfg
        self.state, self.config, self.device = state, cfg, device
        self.recipe = Recipe.of_trained(state.recipe, cfg.data.root, cfg.data.image_size, str(path))
        self.head_kind, self.head_state = cfg.model.head, trained.head.state()
        self.network = trained.network
        self.model = GradingModel(self.network, trained.head, self.recipe).to(device).eval()
        self.precision: Precision = trained.execution.precision

    @torch.no_grad()
    def grade(self, images: Tensor, tta: str = "none") -> Graded:
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast(self.device):
            aggregated = self.model.aggregated(images, tta).float()
        head = self.model.head
        return Graded(head.predict(aggregated).cpu().numpy(), head.values(aggregated).cpu().numpy(),
                      head.referable_score(aggregated).cpu().numpy())


class ExportedGrader(Grader):
    """A model dr_resnet.export wrote: ONNX (run by ONNX Runtime) or TorchScript. Its recipe and head
    travel inside the file. With TTA the views' reported values are averaged, then decoded by the head."""

    def __init__(self, path: str | os.PathLike, device: torch.device) -> None:
        path = Path(path)
        self.device = device
        if path.suffix == ONNX_SUFFIX:
            self.source, metadata = "onnx", self._open_onnx(path)
        else:
            self.source, metadata = "torchscript", self._open_torchscript(path)
        try:
            self.metadata = json.loads(metadata)
            self.recipe = Recipe.from_dict(self.metadata["recipe"])
            self.head_kind, self.head_state = self.metadata["head"]["kind"], self.metadata["head"]["state"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: its dr_resnet metadata is missing or damaged ({exc}); export it again") from None
        self.head = build_head(self.head_kind)
        self.head.load_state(self.head_state)

    def _open_onnx(self, path: Path) -> str:
        try:
            import onnxruntime
        except ImportError:
            raise ModelLoadError(f"{path}: running ONNX models needs onnxruntime: pip install 'dr-resnet[export]'") from None
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ModelLoadError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if metadata is None:
            raise ModelLoadError(f"{path}: an ONNX model without dr_resnet metadata (not written by dr_resnet.export)")
        return metadata

    def _open_torchscript(self, path: Path) -> str:
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        except Exception as exc:  # torch.jit raises RuntimeError or ValueError for files it cannot read
            raise ModelLoadError(f"{path}: not a readable TorchScript model ({str(exc).splitlines()[0][:200]})") from None
        if not extra[f"{METADATA_KEY}.json"]:
            raise ModelLoadError(f"{path}: a TorchScript model without dr_resnet metadata (not written by dr_resnet.export)")
        return extra[f"{METADATA_KEY}.json"]

    def _run(self, images: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.source == "onnx":
            grades, values, referable = self.session.run(list(OUTPUT_NAMES), {"images": images.cpu().numpy()})
            return grades, values, referable
        with torch.no_grad():
            out = self.module(images.to(self.device))
        return tuple(t.cpu().numpy() for t in out)

    def grade(self, images: Tensor, tta: str = "none") -> Graded:
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if tta == "none":
            return Graded(*self._run(images.contiguous()))
        values = np.mean([self._run(v.contiguous())[1] for v in _views(images, tta)], axis=0, dtype=np.float64)
        aggregated = self.head.aggregated_of(torch.from_numpy(values.astype(np.float32)))
        return Graded(self.head.predict(aggregated).numpy(), self.head.values(aggregated).numpy(),
                      self.head.referable_score(aggregated).numpy())


def load_grader(path: str | os.PathLike, device: torch.device, amp: str = "auto") -> Grader:
    """The model in `path`: a training checkpoint (.pt), an exported model (.onnx, .ts), or an export
    folder (its model file)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (ONNX_SUFFIX, TORCHSCRIPT_SUFFIX))
        if not found:
            raise ModelLoadError(f"{path}: a folder without a model.onnx or model.ts (dr_resnet.export writes them)")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint(path) if pruned_note(path.parent) else f"model not found: {path}")
    if path.suffix in (ONNX_SUFFIX, TORCHSCRIPT_SUFFIX):
        return ExportedGrader(path, device)
    return CheckpointGrader(path, device, amp)
