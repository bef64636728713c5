"""The recipe: what a photo goes through before the network. Training records it in the checkpoint and
in config.yaml, export embeds it in the exported file, and predict applies it, so a model is never fed
images prepared differently from the ones it learned on.

    preprocess   the settings of the data root's preprocess.json (crop threshold, side, Graham or not),
                 or None when the model was trained on a folder that preprocess did not write (its
                 photos were only padded to a square and resized, as data.load_image does)
    image_size   the side the network sees (data.image_size)
    mean, std    the per-channel normalisation of the [0, 1] RGB values
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dr_resnet.data.dataset import IMAGENET_MEAN, IMAGENET_STD, fit_square, load_image
from dr_resnet.data.formats import DatasetError
from dr_resnet.data.preprocess import BadImageError, Settings, crop_square, read_settings

log = logging.getLogger(__name__)
BLACK_LEVEL = Settings.threshold  # an image with no pixel above this has no retina


@dataclass(frozen=True)
class Recipe:
    image_size: int
    preprocess: Settings | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    assumed: bool = field(default=False, compare=False)  # not recorded: a checkpoint from before recipes

    @classmethod
    def of_data(cls, root: str | os.PathLike, image_size: int) -> "Recipe":
        """The recipe of a model trained at image_size on the dataset in `root`."""
        return cls(image_size, read_settings(root))

    @classmethod
    def assume(cls, data_root: str | os.PathLike, image_size: int, source: str) -> "Recipe":
        """For a checkpoint written before recipes were recorded: the data root's preprocess.json if it is
        still there, else preprocess's default settings at the trained size (with a warning either way)."""
        settings = read_settings(data_root) if Path(data_root).is_dir() else None
        where = f"the settings of {Path(data_root) / 'preprocess.json'}"
        if settings is None:
            settings = Settings(size=image_size)
            where = f"preprocess's defaults at {image_size} px ({asdict(settings)})"
        log.warning("%s records no preprocessing recipe (written before dr_resnet recorded one): assuming %s; "
                    "photos prepared otherwise would be graded wrongly", source, where)
        return cls(image_size, settings, assumed=True)

    @classmethod
    def of_trained(cls, recorded: dict | None, data_root: str | os.PathLike, image_size: int, source: str) -> "Recipe":
        """A trained model's recipe: the one its checkpoint records, else assumed (see assume)."""
        return cls.from_dict(recorded) if recorded else cls.assume(data_root, image_size, source)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "preprocess": asdict(self.preprocess) if self.preprocess else None,
                "mean": list(self.mean), "std": list(self.std),
                "input": "RGB, uint8 (N, 3, image_size, image_size); the network sees (x / 255 - mean) / std"}

    @classmethod
    def from_dict(cls, content: dict) -> "Recipe":
        try:
            settings = content.get("preprocess")
            return cls(int(content["image_size"]), Settings(**settings) if settings else None,
                       tuple(content.get("mean", IMAGENET_MEAN)), tuple(content.get("std", IMAGENET_STD)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a dr_resnet recipe ({exc!r}): {content}") from exc

    def is_prepared(self, width: int, height: int) -> bool:
        """Whether a photo of this size is one preprocess already prepared for this recipe (a square of
        the recipe's side): it is then used as it is, not cropped twice."""
        return self.preprocess is None or width == height == self.preprocess.size

    def prepare(self, path: str | os.PathLike) -> Tensor:
        """The uint8 (3, S, S) image the network gets for the photo at `path`, raw or prepared: a raw
        photo is cropped, squared, resized (and Graham-normalised) by preprocess's own code, then
        brought to image_size as training's loader does. BadImageError names the file and why."""
        try:
            with Image.open(path) as probe:
                width, height = probe.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "cannot be read"
            raise BadImageError(f"{path}: {kind} ({exc})") from None
        if not self.is_prepared(width, height):
            cropped = crop_square(Path(path), self.preprocess)
            return fit_square(torch.from_numpy(np.array(cropped)).permute(2, 0, 1).contiguous(), self.image_size)
        try:
            image = load_image(path, self.image_size)
        except (DatasetError, OSError, ValueError) as exc:
            raise BadImageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        graham = self.preprocess is not None and self.preprocess.normalize == "graham"
        if not graham and int(image.max()) <= BLACK_LEVEL:
            raise BadImageError(f"{path}: no retina found (no pixel brighter than {BLACK_LEVEL}; an all-black image)")
        return image
