"""Torch-free tables of what can be chosen: the ResNet architectures (block, layer counts, torchvision
weights), the output heads and the dataset formats. Config validation, the CLIs' choices and the
models read them here, so a new depth, head or format is one line (plus its code: model/heads.py HEAD_TYPES
for a head, data/formats.py for a format). A head's spec says what its outputs mean to the code
that never builds the head (predictions, exports, heat maps)."""

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

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")  # what counts as a photo (lower case)

FORMATS = ("lab", "kaggle", "aptos")  # the layouts dr-resnet also writes (formats.SplitLayout; synthetic, preprocess)
DATASETS = ("eyepacs", "idrid", "messidor2", "ddr")  # public datasets as shipped (formats.PRESETS), read only
READ_FORMATS = (*FORMATS, "csv", "folders", *DATASETS)  # csv: any table (the data.*_csv keys); folders: {split}/{grade}/
FORMAT_CHOICES = ("auto", *READ_FORMATS)  # "auto": lab, kaggle, aptos or folders, detected from the files present

@dataclass(frozen=True)
class HeadSpec:
    """What a head's outputs mean, for the code that never holds the head itself (predictions.csv,
    predict's CSV, exported models, model cards, heat maps, config checks): torch-free."""

    kind: str
    outputs: int  # the output layer's width
    reports: str  # what a prediction reports per image: "probabilities" (of the five grades) or "score"
    # (one number on the grade scale, cut at thresholds that travel with the model)
    cam_target: str  # the output a heat map explains: "grade" (the predicted grade's), "score" (the only
    # output) or "above previous" (ordinal: "grade > g - 1", the boundary the prediction crossed last)

    @property
    def has_probabilities(self) -> bool:
        return self.reports == "probabilities"

    @property
    def has_thresholds(self) -> bool:
        return self.reports == "score"

    @property
    def value_columns(self) -> list[str]:
        """The per-image columns of what it reports (predictions.csv, predict's CSV)."""
        return [f"p_grade{k}" for k in range(5)] if self.has_probabilities else ["score"]


HEAD_SPECS: dict[str, HeadSpec] = {s.kind: s for s in (
    HeadSpec("classification", 5, "probabilities", "grade"),
    HeadSpec("regression", 1, "score", "score"),
    HeadSpec("ordinal", 4, "probabilities", "above previous"),
)}
HEADS = tuple(HEAD_SPECS)  # model.head (heads.HEAD_TYPES implements each)

NONFINITE = ("stop", "skip")  # train.nonfinite: what a non-finite loss or gradient does (loop.Trainer)
