"""Torch-free tables of what can be chosen: the ResNet architectures (block, layer counts, torchvision
weights), the output heads and the dataset formats. Config validation, the CLIs' choices and the
models read them here, so a new depth, head or format is one line (plus its code: heads.HEAD_TYPES
for a head, formats.SplitLayout for a format)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    depth: int
    block: str  # "basic" (two 3x3 convolutions) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
    layers: tuple[int, int, int, int]  # blocks in each of the four stages
    weights: str  # torchvision's weight enum (its IMAGENET1K_V1 member is "imagenet")


ARCHITECTURES: dict[int, Architecture] = {a.depth: a for a in (
    Architecture(18, "basic", (2, 2, 2, 2), "ResNet18_Weights"),
    Architecture(34, "basic", (3, 4, 6, 3), "ResNet34_Weights"),
    Architecture(50, "bottleneck", (3, 4, 6, 3), "ResNet50_Weights"),
    Architecture(101, "bottleneck", (3, 4, 23, 3), "ResNet101_Weights"),
    Architecture(152, "bottleneck", (3, 8, 36, 3), "ResNet152_Weights"),
)}
DEPTHS = tuple(sorted(ARCHITECTURES))

FORMATS = ("lab", "kaggle", "aptos")  # on-disk dataset layouts (formats.SplitLayout reads each)
FORMAT_CHOICES = ("auto", *FORMATS)  # "auto": detected from the split files present

HEADS = ("classification", "regression", "ordinal")  # model.head (heads.HEAD_TYPES implements each)

NONFINITE = ("stop", "skip")  # train.nonfinite: what a non-finite loss or gradient does (engine.Trainer)
