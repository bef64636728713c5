"""The linear probe (model.freeze_backbone): the standard check of what a backbone learned. Only the
output layer trains on the backbone's fixed features; the backbone's BatchNorm layers normalise with the
statistics they hold and never move them (loop.train_mode keeps them in eval mode); the optimizer holds
the output layer alone, without weight decay (components.optimisation).

A random backbone has no statistics worth keeping: its BatchNorm layers hold the initial mean 0 and
variance 1, so its features reach the probe unnormalised, at whatever scale the random weights give them,
and a probe of it would measure that scale, not the absence of learning. `reestimate_batchnorm` gives such
a backbone the statistics of the training images first, once at the run's start. A loaded backbone keeps
its own: they are part of what it learned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from dr_resnet.training import distributed

HEAD_PREFIX = "fc."  # the ResNet's output layer (model.resnet.ResNet.fc): what a linear probe trains


def freeze_backbone(network: nn.Module) -> list[str]:
    """Every parameter outside the output layer stops taking gradients; returns the names of those that
    still train (fc.weight, fc.bias). Called on the bare network before DDP wraps it: DDP registers
    gradient hooks for the parameters that train only, and the output layer is used by every forward pass,
    so no rank waits for a gradient that never comes (find_unused_parameters is not needed)."""
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name.startswith(HEAD_PREFIX))
    trained = trained_names(network)
    if not trained:
        raise ValueError(f"the network has no parameters named {HEAD_PREFIX}*: nothing would train in a linear probe")
    return trained


def trained_names(network: nn.Module) -> list[str]:
    """The names of the parameters that take gradients."""
    return [name for name, parameter in network.named_parameters() if parameter.requires_grad]


def trained_count(network: nn.Module) -> int:
    """How many numbers training updates: all the network's parameters, or the output layer's in a probe."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm layer whose weight and bias do not train (a probe's backbone): its running statistics
    are frozen with them, so it normalises in eval mode also during training (loop.train_mode)."""
    return (isinstance(module, _BatchNorm) and module.affine
            and not any(p.requires_grad for p in module.parameters(recurse=False)))


@torch.no_grad()
def reestimate_batchnorm(network: nn.Module, inputs: Iterable[Tensor],
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> int:
    """Replace every BatchNorm layer's running statistics by those of `inputs` (normalised batches) with
    torch's update_bn: one pass in train mode with momentum None, so each layer's running mean and variance
    become the cumulative average of its batch statistics (the unbiased variance, as BatchNorm keeps it);
    momentum and mode are put back. Batches of one image are left out (BatchNorm in train mode refuses a
    single value per channel, as at a 1x1 layer4). Under DDP each rank passes its own share and the ranks'
    averages are then averaged, weighted by their numbers of batches: the cumulative average of every rank's
    batches, the same on every rank. Returns the number of batches over every rank."""
    counted = [0]

    def batches() -> Iterable[Tensor]:
        for x in inputs:
            if x.shape[0] >= 2:
                counted[0] += 1
                yield x

    with autocast():
        update_bn(batches(), network)
    layers = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    total = counted[0]
    if layers and distributed.is_distributed():
        total = average_over_ranks(layers, counted[0])
    if layers and total == 0:
        raise ValueError("no batch of two or more images to re-estimate the BatchNorm statistics on")
    return total


def average_over_ranks(layers: list[_BatchNorm], batches: int) -> int:
    """Each layer's running mean and variance averaged over the ranks, weighted by each rank's number of
    batches (one all-reduce, in float64), and the total as every layer's count of batches; returns it."""
    device = layers[0].running_mean.device
    weighted = [torch.cat([m.running_mean.double(), m.running_var.double()]) * batches for m in layers]
    stacked = distributed.all_reduce_sum(torch.cat([*weighted, torch.tensor([batches], dtype=torch.float64,
                                                                           device=device)]))
    total = int(stacked[-1].item())
    if total == 0:
        return 0
    start = 0
    for m in layers:
        width = m.running_mean.numel()
        m.running_mean.copy_(stacked[start:start + width] / total)
        m.running_var.copy_(stacked[start + width:start + 2 * width] / total)
        m.num_batches_tracked.fill_(total)
        start += 2 * width
    return total
