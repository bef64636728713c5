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

from .data import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentParams:
    angles: Tensor  # degrees, counter-clockwise (torchvision's convention)
    hflip: Tensor  # bool
    vflip: Tensor  # bool


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 (N, 3, H, W) -> float, scaled to [0, 1] then normalised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def sample_params(n: int, max_rotation: float, flips: bool, generator: torch.Generator) -> AugmentParams:
    """Angles uniform in [-max_rotation, max_rotation]; each flip with probability 0.5 when flips is on."""
    angles = (torch.rand(n, generator=generator) * 2 - 1) * max_rotation
    if flips:
        hflip, vflip = torch.rand(n, generator=generator) < 0.5, torch.rand(n, generator=generator) < 0.5
    else:
        hflip = vflip = torch.zeros(n, dtype=torch.bool)
    return AugmentParams(angles, hflip, vflip)


def apply_params(images: Tensor, params: AugmentParams) -> Tensor:
    """Rotate each image by its angle, then flip it as told (as torchvision's rotate, hflip, vflip in turn)."""
    n, _, h, w = images.shape
    theta = torch.deg2rad(params.angles.to(images.device, torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    sx = 1 - 2 * params.hflip.to(images.device, torch.float32)
    sy = 1 - 2 * params.vflip.to(images.device, torch.float32)
    # grid_sample maps each output point to the input point it reads: flips first (they come last), then
    # the inverse rotation. The aspect terms keep the rotation rigid on non-square images.
    matrix = torch.zeros(n, 2, 3, device=images.device)
    matrix[:, 0, 0] = cos * sx
    matrix[:, 0, 1] = -sin * sy * h / w
    matrix[:, 1, 0] = sin * sx * w / h
    matrix[:, 1, 1] = cos * sy
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DeviceAugment:
    """Training: random rotation + flips + normalisation of a uint8 batch; evaluation: normalisation only."""

    def __init__(self, max_rotation: float = 20.0, flips: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.max_rotation, self.flips, self.mean, self.std = max_rotation, flips, mean, std

    @property
    def geometric(self) -> bool:
        return self.max_rotation > 0 or self.flips

    def train(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if not self.geometric:
            return normalize(images, self.mean, self.std)
        # Geometry on the normalised image would fill rotated-in corners with 0 = the mean colour, not black:
        # rotate the [0, 255] image, then normalise.
        rotated = apply_params(images.float(), sample_params(images.shape[0], self.max_rotation, self.flips, generator))
        return normalize(rotated, self.mean, self.std)

    def eval(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation random stream of one rank in one epoch: a pure function of (seed, epoch, rank),
    so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + rank) % 2**63)
