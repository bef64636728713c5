"""The two augmented views of each fundus photo that BYOL compares, made on the training device.

A fundus photo is a retina on a black surround. A view keeps that: a random square crop inside the retina's
bounding box (an area share in [crop_scale, 1] of the box), resized back to the image size, rotated and
flipped, with mild per-sample colour changes (brightness, contrast, saturation), and the surround black.
The retina mask (a pixel is retina where its brightest channel exceeds RETINA_THRESHOLD) goes through the
same geometry as the photo, as a fourth channel of the same grid_sample call, and the coloured view is
multiplied by it: a contrast change, which would lift black towards the mean, never lifts the surround.

As data/augment.py does for training, the geometry is one batched affine_grid + grid_sample per view, each
sample with its own matrix: crop scale and offset, rotation and flips in one affine, in augment's
convention (angles counter-clockwise in degrees, rotate then flip, bilinear, black fill; its angles and
flips drawn by its sample_params). Geometry and colour work on the [0, 255] image; normalisation last,
so the surround is exactly the normalised value of black.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dr_resnet.data.augment import AugmentParams, _scale_and_shift, normalize, sample_params
from dr_resnet.data.dataset import IMAGENET_MEAN, IMAGENET_STD

RETINA_THRESHOLD = 10  # of 255: a pixel whose brightest channel exceeds it is retina, the rest the black surround
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewParams:
    """One view's random draws for a batch of N photos."""

    matrix: Tensor  # (N, 2, 3): output -> input point in normalised coordinates, affine_grid's theta
    turn: AugmentParams  # the rotations and flips within `matrix`, as data.augment draws them
    brightness: Tensor  # (N,) factor: x * b
    contrast: Tensor  # (N,) factor: mean + c (x - mean), the mean grey over the view's retina
    saturation: Tensor  # (N,) factor: grey + s (x - grey)


def retina_mask(images: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, 1, H, W) bool: where the brightest channel exceeds RETINA_THRESHOLD."""
    return images.amax(dim=1, keepdim=True) > RETINA_THRESHOLD


def retina_box(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bounding box of each mask (N, 1, H, W) as (left, top, right, bottom), (N,) each, in affine_grid's
    normalised coordinates (align_corners=False: the image spans [-1, 1], a pixel's edges included). A photo
    with no retina pixel gets the whole image. Computed on the device: nothing waits for it."""
    _, _, h, w = mask.shape
    rows = mask.any(dim=3).squeeze(1).to(torch.uint8)  # (N, H): a retina pixel in the row
    cols = mask.any(dim=2).squeeze(1).to(torch.uint8)  # (N, W)
    top, left = rows.argmax(dim=1), cols.argmax(dim=1)  # the first row or column holding one (0 if none)
    bottom = h - rows.flip(1).argmax(dim=1)  # one past the last (h if none)
    right = w - cols.flip(1).argmax(dim=1)
    return left * (2 / w) - 1, top * (2 / h) - 1, right * (2 / w) - 1, bottom * (2 / h) - 1


class FundusViews:
    """Pairs of views of a batch of uint8 fundus photos (N, 3, S, S), as float32 normalised images
    (N, 3, image_size, image_size) on the photos' device, in channels_last layout when asked.

    crop_scale: the smallest area share of the retina's bounding box a crop keeps (the crop is a square; in a
    box so elongated that its largest square holds less, every crop is that square). max_rotation: degrees,
    uniform in +-max_rotation. flips: horizontal and vertical, each with probability 0.5. colour: brightness
    and contrast factors uniform in [1 - colour, 1 + colour], saturation in [1 - colour / 2, 1 + colour / 2].
    """

    def __init__(self, image_size: int, crop_scale: float = 0.35, max_rotation: float = 180.0, flips: bool = True,
                 colour: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels_last: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if not 0 < crop_scale <= 1:
            raise ValueError(f"crop_scale (the smallest area share of the retina a crop keeps) must be in (0, 1], "
                             f"got {crop_scale}")
        if max_rotation < 0:
            raise ValueError(f"max_rotation must be at least 0 degrees, got {max_rotation}")
        if not 0 <= colour < 1:
            raise ValueError(f"colour (the brightness and contrast strength) must be in [0, 1), got {colour}")
        self.image_size, self.crop_scale, self.max_rotation = image_size, crop_scale, max_rotation
        self.flips, self.colour, self.mean, self.std = flips, colour, mean, std
        self.channels_last = channels_last
        self._constants: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}  # mean, std x 255; grey weights

    def pair(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two independent views of each photo; the draws come from `generator` (view 1's, then view 2's), so
        the same generator state gives the same views."""
        mask = retina_mask(_checked(images))
        box = retina_box(mask)
        first = self.render(images, mask, self.sample(box, generator))[0]
        second = self.render(images, mask, self.sample(box, generator))[0]
        return first, second

    def sample(self, box: tuple[Tensor, Tensor, Tensor, Tensor], generator: torch.Generator) -> ViewParams:
        """One view's draws for photos whose retina boxes are `box` (retina_box's), on the generator's device
        (a CUDA generator: nothing leaves the GPU)."""
        left, top, right, bottom = (edge.to(generator.device, torch.float32) for edge in box)
        n, device = left.shape[0], generator.device

        def uniform(low: float | Tensor, high: float | Tensor) -> Tensor:
            return low + (high - low) * torch.rand(n, generator=generator, device=device)

        turn = sample_params(n, self.max_rotation, self.flips, generator)
        width, height = right - left, bottom - top
        share = uniform(self.crop_scale, 1.0)
        side = torch.minimum(torch.sqrt(share * width * height), torch.minimum(width, height))
        centre_x = uniform(left + side / 2, right - side / 2)
        centre_y = uniform(top + side / 2, bottom - side / 2)
        theta = torch.deg2rad(turn.angles.float())
        cos, sin = torch.cos(theta), torch.sin(theta)
        sx, sy = 1 - 2 * turn.hflip.float(), 1 - 2 * turn.vflip.float()
        half = side / 2  # the crop's half side: the output's [-1, 1] onto it
        # augment.apply_params' matrix on a square image (rotation after the flips, read backwards), scaled onto
        # the crop and moved to its centre.
        matrix = torch.stack([torch.stack([half * cos * sx, -half * sin * sy, centre_x], dim=1),
                              torch.stack([half * sin * sx, half * cos * sy, centre_y], dim=1)], dim=1)
        c = self.colour
        return ViewParams(matrix, turn, uniform(1 - c, 1 + c), uniform(1 - c, 1 + c), uniform(1 - c / 2, 1 + c / 2))

    def render(self, images: Tensor, mask: Tensor, params: ViewParams) -> tuple[Tensor, Tensor]:
        """The normalised view of each photo under `params`, and its retina mask after the same geometry
        ((N, 1, size, size), in [0, 1]; the view is exactly black where it is 0)."""
        n = images.shape[0]
        device = images.device
        stacked = torch.cat([images.float(), mask.float()], dim=1)  # the mask rides the photo's grid_sample
        grid = F.affine_grid(params.matrix.to(device), [n, 4, self.image_size, self.image_size], align_corners=False)
        moved = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        rgb, view_mask = moved[:, :3], moved[:, 3:]
        if device not in self._constants:  # built once per device, then reused every step
            self._constants[device] = (*_scale_and_shift(self.mean, self.std, device),
                                       torch.tensor(GREY_WEIGHTS, device=device).view(1, 3, 1, 1))
        mean, std, grey_weights = self._constants[device]
        if self.colour > 0:
            rgb = _colour(rgb, view_mask, grey_weights, *(f.to(device).view(n, 1, 1, 1)
                                                          for f in (params.brightness, params.contrast,
                                                                    params.saturation)))
        rgb = rgb * view_mask  # a new tensor, in the layout normalize reads best
        return normalize(rgb, constants=(mean, std), channels_last=self.channels_last), view_mask


def _colour(rgb: Tensor, mask: Tensor, weights: Tensor, brightness: Tensor, contrast: Tensor,
            saturation: Tensor) -> Tensor:
    """Brightness, contrast, saturation in turn on [0, 255] images, clamped after each as torchvision's
    adjust_* are; `weights` (1, 3, 1, 1) make grey. Contrast pivots on the mean grey of the view's retina, not
    of the whole image: the black surround would pull the pivot down by however much of the view it fills."""
    rgb = rgb.mul_(brightness).clamp_(0, 255)  # in place: `rgb` is render's own intermediate, spared copies
    grey = (rgb * weights).sum(dim=1, keepdim=True)
    pivot = (grey * mask).sum(dim=(2, 3), keepdim=True) / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    rgb = rgb.sub_(pivot).mul_(contrast).add_(pivot).clamp_(0, 255)
    grey = (rgb * weights).sum(dim=1, keepdim=True)
    return rgb.sub_(grey).mul_(saturation).add_(grey).clamp_(0, 255)


def _checked(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"FundusViews wants square uint8 photos (N, 3, S, S), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images
