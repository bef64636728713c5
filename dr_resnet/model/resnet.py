"""ResNets written by hand with torchvision's parameter names: BasicBlock (18, 34) and Bottleneck (50,
101, 152), the depths of registry.ARCHITECTURES.

A torchvision ResNet state dict loads into these models with ``strict=True``, so ImageNet weights come
from torchvision's own weight enums and cache (``$TORCH_HOME/hub/checkpoints``) or from any file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from dr_resnet.config import is_pretrained, recorded_initialisation
from dr_resnet.errors import UserError
from dr_resnet.registry import ARCHITECTURES, DEPTHS, Architecture

log = logging.getLogger(__name__)

NUM_GRADES = 5


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: ResNet v1.5 as torchvision), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem (7x7 conv, max-pool), four stages of residual blocks, global average pool, linear head."""

    def __init__(self, block: Block, layers: list[int], num_classes: int = NUM_GRADES,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        # The one place the shortcut is decided: project whenever the shape changes.
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.in_planes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity, which helps deep nets train from scratch (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        # The output layer runs in fp32 even under autocast: bf16 would round a regressed grade to steps
        # of 1/64-1/128 (tying thresholds and the referable AUC), and it costs nothing measurable.
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(features.float())


BLOCKS: dict[str, Block] = {"basic": BasicBlock, "bottleneck": Bottleneck}  # registry.Architecture.block


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights were asked for and cannot be had; never answered by a silent random init."""


def _imagenet_weights_enum(depth: int):
    import torchvision.models

    return getattr(torchvision.models, architecture(depth).weights).IMAGENET1K_V1


def architecture(depth: int) -> Architecture:
    if depth not in ARCHITECTURES:
        raise ValueError(f"model depth must be one of {', '.join(map(str, DEPTHS))}, got {depth}")
    return ARCHITECTURES[depth]


def imagenet_cache_path(depth: int) -> Path:
    """Where torchvision's cache keeps the IMAGENET1K_V1 file for this depth ($TORCH_HOME/hub/checkpoints)."""
    url = _imagenet_weights_enum(depth).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_state_dict(depth: int) -> dict[str, Tensor]:
    """IMAGENET1K_V1 weights through torchvision's enum and cache; a clear error when they are absent."""
    weights = _imagenet_weights_enum(depth)
    cached = imagenet_cache_path(depth)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # no network, proxy refused, partial file: all mean "not here"
        raise WeightsNotFoundError(
            f"ImageNet weights for resnet{depth} are not in torchvision's cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}).\n  expected file: {cached}\n  fix: on a machine with internet run "
            f"`curl -L -o {cached.name} {weights.url}` and copy it to {cached.parent}/ (or set TORCH_HOME), "
            f"or pass the file's path as the weights (model.weights=/path/{cached.name})."
        ) from exc


def evaluated_weights(model: Mapping[str, Tensor], ema: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The weights a dr_resnet checkpoint evaluated and selected: with train.ema its weight average's
    (`ema`: module.* weights and statistics, and n_averaged, the layout of torch's AveragedModel, which
    wrote it before training.average did), else the model's own."""
    if not ema:
        return model
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A plain state dict, or a dr_resnet checkpoint (the weights it evaluated: its ``ema`` entry's average
    with train.ema, else its ``model`` entry), or a backbone file (its ``model`` entry, without ``fc.*``; its
    initialisation logged); ``module.`` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "initialisation" in state:  # a backbone `python -m dr_resnet.pretrain` wrote
        pretraining = state.get("pretraining") if isinstance(state.get("pretraining"), Mapping) else {}
        log.info("%s: a backbone of initialisation %s (%s)", path, state["initialisation"],
                 ", ".join(f"{k} {pretraining[k]}" for k in ("method", "epochs", "images") if k in pretraining)
                 or "no pretraining record")
        named = recorded_initialisation(str(path))
        if named != state["initialisation"]:  # the arm's name and learning rate come from the record beside it
            raise WeightsMismatchError(
                f"{path} is a backbone of initialisation {state['initialisation']}, but the record beside it "
                f"({path.with_suffix('.json').name}) is missing or says {named}: the run would be named and trained "
                f"as {named}; copy the backbone's {path.with_suffix('.json').name} from its pretraining folder beside it")
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = evaluated_weights(state["model"], state.get("ema") or {})
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with a 'model' entry, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_resnet(depth: int, num_classes: int = NUM_GRADES, weights: str | os.PathLike | None = None,
                 zero_init_residual: bool = False, head_bias: float | Sequence[float] | None = None) -> ResNet:
    """ResNet of `depth` (registry.DEPTHS: 18, 34, 50, 101, 152) with a `num_classes` head.

    weights: None (random init), "imagenet" (backbone from IMAGENET1K_V1, fresh head unless
    num_classes == 1000) or a path to a state dict / checkpoint / backbone file. A file whose head has another
    number of classes, or none (a backbone: `python -m dr_resnet.pretrain`'s), gives the backbone and a fresh
    head; every other key must match exactly.
    head_bias: the output bias of a fresh head, one value or one per output (a regression head starts at
    the mean training grade, an ordinal head at its training prevalences); a loaded head keeps its own.
    """
    arch = architecture(depth)
    model = ResNet(BLOCKS[arch.block], list(arch.layers), num_classes=num_classes, zero_init_residual=zero_init_residual)
    if head_bias is not None:  # one value for every output, or one per output
        with torch.no_grad():
            model.fc.bias.copy_(torch.as_tensor(head_bias, dtype=model.fc.bias.dtype).expand_as(model.fc.bias))
    if weights is None or not is_pretrained(weights):
        return model
    if str(weights).lower() == "imagenet":
        state, source = load_imagenet_state_dict(depth), f"torchvision IMAGENET1K_V1 ({imagenet_cache_path(depth)})"
    else:
        state, source = load_state_dict_file(weights), str(weights)
    _load_backbone(model, state, source, depth)
    return model


HEAD_KEYS = ("fc.weight", "fc.bias")  # what a backbone (or weights with another head) leaves to a fresh head


class WeightsMismatchError(UserError, ValueError):
    """Weights of another architecture than the model asks for; the message names both."""


def architecture_of(state: Mapping[str, Tensor]) -> int | None:
    """The registry depth whose block and stage sizes these ResNet weights have (None: none of them)."""
    layers = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    block = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    return next((a.depth for a in ARCHITECTURES.values() if (a.block, a.layers) == (block, layers)), None)


def _load_backbone(model: ResNet, state: Mapping[str, Tensor], source: str, wanted: int) -> None:
    """`state` into the ResNet{wanted} `model` (see build_resnet); another architecture is one error naming both."""
    head_shape = model.fc.weight.shape
    state = dict(state)
    found = architecture_of(state)
    if found != wanted:
        what = f"ResNet{found} weights" if found else "no ResNet's weights (of registry.ARCHITECTURES)"
        hint = f": set model.depth={found} or give weights of a ResNet{wanted}" if found else ""
        raise WeightsMismatchError(f"{source} holds {what}; model.depth={wanted} builds a ResNet{wanted}{hint}")
    backbone = not any(k in state for k in HEAD_KEYS)  # pretrain's backbone.pt: no classifier at all
    if backbone or ("fc.weight" in state and state["fc.weight"].shape != head_shape):
        if backbone:
            log.info("weights from %s: a backbone without a classifier: keeping a fresh head", source)
        else:
            log.info("weights from %s: head has %d classes, model %d: keeping a fresh head",
                     source, state["fc.weight"].shape[0], head_shape[0])
            for k in HEAD_KEYS:
                state.pop(k, None)
        _load_all_but_head(model, state, source, wanted)
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # a shape or key that does not fit
            raise _mismatch(exc, source, wanted) from None
    log.info("loaded weights from %s", source)


def _load_all_but_head(model: ResNet, state: Mapping[str, Tensor], source: str, wanted: int) -> None:
    """`state` into every parameter and statistic of `model` but the head (HEAD_KEYS, which stays fresh): any
    other key missing, unexpected or of another shape is one error naming the counts and the first keys."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that does not fit
        raise _mismatch(exc, source, wanted) from None
    missing = [k for k in missing if k not in HEAD_KEYS]
    if missing or unexpected:
        raise WeightsMismatchError(f"weights from {source} do not fit ResNet{wanted}: besides {', '.join(HEAD_KEYS)}, "
                                   f"{len(missing)} key(s) missing (first {missing[:3]}), {len(unexpected)} unexpected "
                                   f"(first {list(unexpected)[:3]})")


def _mismatch(exc: RuntimeError, source: str, wanted: int) -> WeightsMismatchError:
    """torch's load_state_dict error as one line: its first listed problem (torch puts each on a line)."""
    lines = str(exc).splitlines()
    return WeightsMismatchError(f"weights from {source} do not fit ResNet{wanted}: "
                                f"{lines[1].strip() if len(lines) > 1 else exc}")


def resnet18(num_classes: int = NUM_GRADES, weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    return build_resnet(18, num_classes, weights, **kwargs)


def resnet50(num_classes: int = NUM_GRADES, weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    return build_resnet(50, num_classes, weights, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

