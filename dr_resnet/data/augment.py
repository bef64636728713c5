"""Batched augmentation on the training device: per-sample random rotation and flips, then normalisation.

Data workers only decode to uint8 (one core decodes ~3x more images than it runs the lab's PIL
rotate/flip/normalise pipeline on). The geometric part becomes one affine_grid + grid_sample call per
batch, with each sample's own angle and flips, matching torchvision's rotate -> hflip -> vflip
(bilinear, black fill). torchvision's v2 transforms draw one set of parameters per call, so a batched
call would give every image the same rotation; hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dr_resnet.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from dr_resnet.seeds import derive_seed


@dataclass(frozen=True)
class AugmentParams:
    angles: Tensor  # degrees, counter-clockwise (torchvision's convention)
    hflip: Tensor  # bool
    vflip: Tensor  # bool


def _scale_and_shift(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              constants: tuple[Tensor, Tensor] | None = None, channels_last: bool = False) -> Tensor:
    """uint8 (N, 3, H, W) -> float, scaled to [0, 1] then normalised per channel. `constants` (mean and
    std already on the device, x 255) spare a host-to-device copy per call; with channels_last the
    result is written in that layout directly (no extra conversion pass)."""
    mean_t, std_t = constants if constants is not None else _scale_and_shift(mean, std, images.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
    torch.sub(images, mean_t, out=out)
    return out.div_(std_t)


def sample_params(n: int, max_rotation: float, flips: bool, generator: torch.Generator) -> AugmentParams:
    """Angles uniform in [-max_rotation, max_rotation]; each flip with probability 0.5 when flips is on.
    Drawn on the generator's device: a CUDA generator gives parameters that never leave the GPU."""
    device = generator.device
    angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_rotation
    if flips:
        hflip = torch.rand(n, generator=generator, device=device) < 0.5
        vflip = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        hflip = vflip = torch.zeros(n, dtype=torch.bool, device=device)
    return AugmentParams(angles, hflip, vflip)


def apply_params(images: Tensor, params: AugmentParams) -> Tensor:
    """Rotate each image by its angle, then flip it as told (as torchvision's rotate, hflip, vflip in turn)."""
    _, _, h, w = images.shape
    theta = torch.deg2rad(params.angles.to(images.device, torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    sx = 1 - 2 * params.hflip.to(images.device, torch.float32)
    sy = 1 - 2 * params.vflip.to(images.device, torch.float32)
    # grid_sample maps each output point to the input point it reads: flips first (they come last), then
    # the inverse rotation. The aspect terms keep the rotation rigid on non-square images.
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos * sx, -sin * sy * h / w, zero], dim=1),
                          torch.stack([sin * sx * w / h, cos * sy, zero], dim=1)], dim=1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DeviceAugment:
    """Training: random rotation + flips + normalisation of a uint8 batch; evaluation: normalisation only.
    With channels_last the output is in that memory layout, as the model's first convolution wants it."""

    def __init__(self, max_rotation: float = 20.0, flips: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = False) -> None:
        self.max_rotation, self.flips, self.mean, self.std = max_rotation, flips, mean, std
        self.channels_last = channels_last
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def geometric(self) -> bool:
        return self.max_rotation > 0 or self.flips

    def _normalize(self, images: Tensor) -> Tensor:
        if images.device not in self._constants:  # built once per device, then reused every step
            self._constants[images.device] = _scale_and_shift(self.mean, self.std, images.device)
        return normalize(images, constants=self._constants[images.device], channels_last=self.channels_last)

    def train(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if not self.geometric:
            return self._normalize(images)
        # Geometry on the normalised image would fill rotated-in corners with 0 = the mean colour, not black:
        # rotate the [0, 255] image, then normalise.
        params = sample_params(images.shape[0], self.max_rotation, self.flips, generator)
        return self._normalize(apply_params(images.float(), params))

    def eval(self, images: Tensor) -> Tensor:
        return self._normalize(images)


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The augmentation random stream of one rank in one epoch: a pure function of (seed, epoch, rank),
    so a resumed run draws exactly what an uninterrupted one would. On the training device, so that
    drawing the parameters costs no copy (a CUDA stream differs from the CPU one for the same seed)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "augment", epoch, rank))
