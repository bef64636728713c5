"""Retinopathy datasets over the on-disk formats (see formats.py), decoded to uint8 tensors,
and the per-sample train/test transforms. Everything is imported at module level: data workers are
forked, and an import inside a worker can trip import hooks of the parent (W&B installs some)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dr_resnet import NUM_GRADES
from dr_resnet.data.formats import DatasetError, TableOptions, read_split
from dr_resnet.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# torchvision 0.29 marks its image codecs deprecated in favour of torchcodec. We pin 0.29.1, and its
# libjpeg-turbo decoder is ~35% faster than PIL here (700 vs 510 decodes/s of 512 px JPEGs on one
# core, same pixels), which matters when the CPU feeds GPUs; PIL remains the fallback for other files.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class UnreadableImageError(DatasetError):
    """An image of a split that cannot be read (any more): the message names the file, its row in the
    split's file and the split. Raised in a data worker, it reaches the training process with the same
    message (DataLoader re-raises a worker's error as its type built from a text that also holds the
    worker's traceback: that text is cut back to the original message)."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _decode_with_pil(path: str | os.PathLike) -> Tensor:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def load_image(path: str | os.PathLike, size: int | None = None) -> Tensor:
    """Decode to a uint8 RGB tensor (3, H, W); with size, pad to a centred square and resize to size x size."""
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError:  # TIFF, BMP, CMYK JPEG...: what torchvision cannot read, PIL may
        try:
            image = _decode_with_pil(path)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot decode image ({exc})") from exc
    return image if size is None else fit_square(image, size)


def fit_square(image: Tensor, size: int) -> Tensor:
    """A uint8 (3, H, W) image padded with black to a centred square and resized to size x size: what
    the network sees of every image (training, evaluation, predict)."""
    h, w = image.shape[-2:]
    if h != w:
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        image = F.pad(image, [left, top, side - w - left, side - h - top], fill=0)
    if image.shape[-1] != size:
        image = F.resize(image, [size, size], antialias=True)
    return image


class RetinopathyDataset(Dataset):
    """Fundus images with grades 0..4 in any data.format (options: a table format's data.* keys).
    ``ds[i]`` is ``(image, label)``, or ``(image, label, i)`` with return_index (a stable sample index, for exact
    distributed evaluation). Without a transform the image is uint8 (3, S, S), ready for batched augmentation on
    the device."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 format: str = "auto", image_size: int | None = None, return_index: bool = False,
                 options: TableOptions | None = None, prepare: Callable[[Path], Tensor] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        index = read_split(self.root, split, format, options)
        self.format, self.names, self.paths, self.labels = index.format, index.names, index.paths, index.labels
        self.patients = index.patients  # each image's patient (dr_resnet.patients)
        self.patient_source = index.patient_source  # where they come from, when not from the names
        self.rows = index.rows  # line of each image in the split's file
        self.split_file = index.index_file
        self.transform = transform
        self.image_size = image_size
        self.return_index = return_index
        self.prepare = prepare  # path -> uint8 (3, S, S): a model's recipe (evaluate on raw photos); None: load_image

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: np.ndarray, split: str) -> "RetinopathyDataset":
        """A dataset of the images where `keep` (a boolean mask) is true, named `split`."""
        part = copy.copy(self)
        rows = np.flatnonzero(keep)
        part.names, part.paths, part.labels = [self.names[i] for i in rows], [self.paths[i] for i in rows], self.labels[rows]
        part.patients = [self.patients[i] for i in rows]
        part.rows = [self.rows[i] for i in rows]
        part.split = split
        return part

    def __getitem__(self, index: int):
        try:
            image = (self.prepare(self.paths[index]) if self.prepare is not None
                     else load_image(self.paths[index], self.image_size))
        except (UserError, OSError) as exc:  # deleted, truncated or overwritten since the split was read
            reason = str(exc).removeprefix(f"{self.paths[index]}: ")
            raise UnreadableImageError(f"{self.paths[index]} (row {self.rows[index]} of {self.split_file}, split "
                                       f"'{self.split}'): {reason}. Restore the file, or remove its row and "
                                       f"start the run again (it resumes from its last checkpoint)") from None
        if self.transform is not None:
            image = self.transform(image)
        label = int(self.labels[index])
        return (image, label, index) if self.return_index else (image, label)

    @property
    def class_counts(self) -> np.ndarray:
        """Images per grade 0..4 (zeros included)."""
        return np.bincount(self.labels, minlength=NUM_GRADES)

    @property
    def majority_baseline(self) -> float:
        """Accuracy of always predicting the most common grade."""
        return float(self.class_counts.max() / len(self))


def training_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    max_rotation: float = 20.0) -> Callable[[Tensor], Tensor]:
    """Per-sample augmentation on a uint8 image: rotation within +-max_rotation, both flips, normalisation."""
    return v2.Compose([v2.RandomRotation(max_rotation, interpolation=v2.InterpolationMode.BILINEAR),
                       v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def evaluation_transform(mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Callable[[Tensor], Tensor]:
    """Normalisation only."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
