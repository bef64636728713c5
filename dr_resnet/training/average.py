"""An exponential moving average of a network's weights, updated on the device without waiting for the host.

train.ema evaluates and selects this average in place of the raw weights. torch's AveragedModel computes
the same average, but it keeps its count of updates as a CPU tensor: every update reads it on the host and
copies it to the device once per dtype group, two host waits a step on a GPU. Here the count is a Python
int, and an update is two foreach kernels launched with plain Python numbers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

PREFIX = "module."  # the averaged network's keys in a saved state, as AveragedModel wrote them
COUNTER = "n_averaged"  # the number of updates so far, as AveragedModel wrote it


class ExponentialAverage:
    """A copy of a network whose floating parameters and buffers (BatchNorm's running statistics) follow
    the network's as an exponential moving average: each update moves them a share (1 - decay) of the way
    towards the network's, so the average covers roughly the last 1 / (1 - decay) updates. The first update
    copies the network (the average of one), as AveragedModel does. Integer buffers (BatchNorm's
    num_batches_tracked) are counts, not weights: they are copied, never averaged.

    The same object is a self-supervised target network (BYOL's, or a momentum encoder's): the average of
    an online network with a given decay, updated after each of its optimizer steps, whose forward pass
    gives the targets. Its parameters take no gradients; a decay schedule sets `decay` before an update.

    Its state (state_dict) keeps AveragedModel's layout: the copy's state dict under "module." and the
    count of updates as "n_averaged", so checkpoints written by either load in both.
    """

    def __init__(self, network: nn.Module, decay: float) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1] (the share of the average kept at each update), got {decay}")
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.decay = decay
        self.updates = 0  # a Python int: deciding the first update reads nothing back from the device

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average towards `network` (the network it copies, or one wrapping it: DDP, compiled),
        after an optimizer step. Launches work on the device and never waits for it."""
        mine, theirs = _tensors(self.module), _tensors(network)
        if len(mine) != len(theirs):
            raise ValueError(f"the network has {len(theirs)} parameters and buffers, its average {len(mine)}: "
                             f"not the network the average was made from")
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            floating = [i for i, t in enumerate(mine) if t.is_floating_point()]
            counts = [i for i, t in enumerate(mine) if not t.is_floating_point()]
            if floating:
                torch._foreach_lerp_([mine[i] for i in floating], [theirs[i] for i in floating], 1 - self.decay)
            if counts:
                torch._foreach_copy_([mine[i] for i in counts], [theirs[i] for i in counts])
        self.updates += 1

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """The count of updates and the copy's state dict, in AveragedModel's layout (keys, order, versions)."""
        state: OrderedDict[str, Tensor] = OrderedDict()
        state._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]  # what a Module writes for itself
        state[COUNTER] = torch.tensor(self.updates, dtype=torch.long)
        return self.module.state_dict(destination=state, prefix=PREFIX)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a state written by state_dict, or by train.ema's AveragedModel before this class."""
        if COUNTER not in state:
            raise KeyError(f"a weight average's state has no {COUNTER!r} (its count of updates); keys: "
                           f"{', '.join(list(state)[:5])}{', ...' if len(state) > 5 else ''}")
        weights = OrderedDict((k, v) for k, v in state.items() if k != COUNTER)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            weights._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]  # stripped below, not the caller's
        consume_prefix_in_state_dict_if_present(weights, PREFIX)
        self.module.load_state_dict(weights)
        self.updates = int(state[COUNTER])


def _tensors(network: nn.Module) -> list[Tensor]:
    """Parameters, then buffers, in the module's order: the pairing AveragedModel uses. Not detached:
    updates run under no_grad, where the foreach kernels write a parameter in place as they would a buffer."""
    return [*network.parameters(), *network.buffers()]
