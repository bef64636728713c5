"""BYOL (Grill et al. 2020, "Bootstrap your own latent"): the networks, the loss, the target's decay and the
collapse measure.

Why BYOL: it needs no negatives, so it holds up at a global batch of about 256 and on small pools of photos
(SimCLR wants batches of thousands; MoCo v2 needs shuffled BatchNorm and a queue larger than a small pool;
DINO is tuned for ViTs). Its loss is per sample, so DDP ranks meet only through SyncBatchNorm in the
projector and predictor.

Why written here: lightly has BYOL's heads and loss, but it pulls hydra-core and pytorch_lightning into
the install; the loss is a few lines, tested against the paper's definition in tests/test_pretraining_method.py.

The pieces:
- OnlineNetwork: backbone -> projector (its `encoder`) -> predictor. The projector's and predictor's
  BatchNorm is plain nn.BatchNorm1d; the command converts the network to SyncBatchNorm under CUDA DDP
  (torch has no SyncBatchNorm on CPU, where each rank normalises its own batch).
- target_network: the target is training.average.ExponentialAverage over the online `encoder` (backbone
  and projector, not the predictor: BYOL's asymmetry), with its decay set from target_decay before each
  update.
- symmetric_loss: byol_loss of each view's prediction against the other view's target projection, summed.
- output_spread: collapse lowers the loss fastest, so a falling loss proves nothing; the spread of the
  normalised outputs does (SimSiam's measure: about 1/sqrt(d) healthy, 0 collapsed). raise_if_collapsed
  turns it into one line.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from dr_resnet.errors import UserError
from dr_resnet.training.average import ExponentialAverage


class CollapseError(UserError):
    """The representation collapsed (every photo maps to nearly the same output): pretraining stops, since
    further steps only lower the loss. The usual fixes: a larger target_decay, a lower learning rate."""


class Projection(nn.Sequential):
    """BYOL's MLP, for the projector and the predictor alike: Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"Projection's {name} must be a positive number of features, got {value}")
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def drop_classifier(resnet: nn.Module) -> nn.Module:
    """dr_resnet's ResNet as a backbone: its `fc` replaced by the identity, in place, so that its forward gives
    the pooled features, its state dict is the backbone file's (no fc.*), and DDP finds no parameter that
    never takes a gradient. Returns the same module."""
    if not isinstance(getattr(resnet, "fc", None), nn.Module):
        raise ValueError(f"{type(resnet).__name__} has no classifier `fc` to drop: not a ResNet")
    resnet.fc = nn.Identity()
    return resnet


class Encoder(nn.Module):
    """Backbone then projector: the part of the online network that the target network averages."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.backbone(images))


class OnlineOutput(NamedTuple):
    """The online network's outputs for the two views, each a pair (view 1, view 2)."""

    projections: tuple[Tensor, Tensor]  # for the spread: the online network's own projections
    predictions: tuple[Tensor, Tensor]  # for the loss, against the target's projections of the other view


class OnlineNetwork(nn.Module):
    """BYOL's online network. `backbone` maps images to (N, in_dim) features (a ResNet after
    drop_classifier); `projector` and `predictor` are Projection heads (in_dim -> d and d -> d).

    forward takes both views, so that one DDP forward covers a step; each view goes through the network
    on its own, so BatchNorm normalises over one view's batch, as in BYOL and SimSiam."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = Encoder(backbone, projector)
        self.predictor = predictor

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, view1: Tensor, view2: Tensor) -> OnlineOutput:
        z1, z2 = self.encoder(view1), self.encoder(view2)
        return OnlineOutput((z1, z2), (self.predictor(z1), self.predictor(z2)))


def target_network(online: OnlineNetwork, decay: float) -> ExponentialAverage:
    """BYOL's target: a weight average of the online encoder (backbone + projector; no predictor), made after
    the online network's conversion to SyncBatchNorm (the target then normalises across ranks as well).

    Its first update is made here, copying the online weights, so that each later update (one after each
    optimizer step, `decay` set from target_decay before it) is BYOL's xi <- tau xi + (1 - tau) theta; the
    average's own first update would otherwise copy the weights after the first step instead.

    Its forward (`.module(images)`, in training mode, as BYOL's target normalises with its batch's
    statistics) gives the target projections; its parameters take no gradients. Its BatchNorm layers get
    momentum 0: a forward leaves their running statistics alone, so those too are the average of the online
    network's, never the target's own batches mixed in.
    """
    target = ExponentialAverage(online.encoder, decay)
    for layer in target.module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = 0.0
    target.update(online.encoder)
    return target


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's loss for one view order: per sample ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), the mean over the
    batch. The target is detached (no gradient reaches the target network, whatever the caller passes) and
    both are taken in float32, so an autocast step loses nothing in the normalisation."""
    if prediction.shape != target.shape or prediction.ndim != 2:
        raise ValueError(f"byol_loss wants two (N, d) tensors of one shape, got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    p = F.normalize(prediction.float(), dim=1)
    z = F.normalize(target.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def symmetric_loss(predictions: tuple[Tensor, Tensor], targets: tuple[Tensor, Tensor]) -> Tensor:
    """BYOL's symmetrised loss: view 1's prediction against view 2's target projection, plus view 2's
    against view 1's (the paper's L + L~; from 0 when aligned to 8 when opposed)."""
    (p1, p2), (z1, z2) = predictions, targets
    return byol_loss(p1, z2) + byol_loss(p2, z1)


def target_decay(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule of the target's decay: tau = 1 - (1 - base) (cos(pi step / total_steps) + 1) / 2,
    from `base` at step 0 up to 1 at the last step."""
    if total_steps < 1:
        raise ValueError(f"target_decay needs at least one step in all, got total_steps={total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"target_decay's step {step} is outside the run's steps 0..{total_steps}")
    if not 0 <= base <= 1:
        raise ValueError(f"the target's base decay must be in [0, 1], got {base}")
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def output_spread(z: Tensor) -> Tensor:
    """The collapse measure: the standard deviation over the batch of the L2-normalised outputs, averaged
    over the dimensions (SimSiam, Chen and He 2021, section 4.1). About 1/sqrt(d) for outputs spread over the
    sphere, 0 when every sample gives the same output. A device tensor: nothing waits for the device here;
    the caller reads it when it logs."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"output_spread wants (N, d) outputs of at least 2 samples, got {tuple(z.shape)}")
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def raise_if_collapsed(spread: float, projection_dim: int, collapse_below: float, step: int) -> None:
    """Stop with one line (CollapseError) when spread x sqrt(projection_dim), about 1 when healthy, falls
    below `collapse_below` (pretrain.collapse_below)."""
    scaled = spread * math.sqrt(projection_dim)
    if not scaled >= collapse_below:  # a NaN spread is a collapse too
        raise CollapseError(f"pretraining collapsed at step {step}: output spread x sqrt({projection_dim}) = "
                            f"{scaled:.4f}, below pretrain.collapse_below={collapse_below} (about 1 when healthy); "
                            f"try a larger pretrain.target_decay or a lower pretrain.lr_base")
