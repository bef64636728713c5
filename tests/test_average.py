"""training.average.ExponentialAverage: train.ema's weight average (and a self-supervised target network).
The same numbers as torch's AveragedModel with its EMA update, which train.ema used before, in the same
saved layout both ways, with its count of updates a Python int and an update that is two foreach kernels."""

import io
from collections import Counter

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from dr_resnet.training.average import ExponentialAverage


def network() -> nn.Module:
    """Parameters, BatchNorm's running statistics (float) and count (int64), and a float64 buffer: every
    kind of tensor a network holds, in two dtype groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    net.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    return net


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One SGD step in training mode: the weights, BatchNorm's statistics and its count all move."""
    g = torch.Generator().manual_seed(step)
    net(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        net.scale.mul_(1.5)


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_the_average_is_torchs_averaged_model_bit_for_bit_with_counts_copied(decay):
    net = network()
    ours = ExponentialAverage(net, decay)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)  # train.ema's before
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(6):
        train_step(net, optimizer, step)
        ours.update(net)
        theirs.update_parameters(net)
        if step == 0:  # the first update copies the network
            assert all(torch.equal(a, b) for a, b in zip(ours.module.state_dict().values(), net.state_dict().values()))
    mine, old = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(old) == ["n_averaged", *(f"module.{k}" for k in net.state_dict())]
    assert mine._metadata == old._metadata  # the modules' versions, which BatchNorm's loading reads
    assert type(ours.updates) is int and ours.updates == 6 and mine["n_averaged"].dtype == torch.long
    for key, value in mine.items():
        if value.is_floating_point():  # weights, running statistics, the float64 buffer: to the bit
            assert value.dtype == old[key].dtype and torch.equal(value, old[key]), key
    # A count is copied, not averaged: AveragedModel averaged it in floats and truncated it (1 here, not 6).
    assert int(mine["module.1.num_batches_tracked"]) == int(net[1].num_batches_tracked) == 6
    assert int(old["module.1.num_batches_tracked"]) != 6


def test_a_state_saved_without_integer_buffers_is_byte_for_byte_averaged_models():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    ours = ExponentialAverage(net, 0.9)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(0.25)
        ours.update(net)
        theirs.update_parameters(net)
    assert saved(ours.state_dict()) == saved(theirs.state_dict())


class Operators(TorchDispatchMode):
    """Every operator run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_an_update_is_two_foreach_kernels_and_reads_nothing_back():
    """AveragedModel read its CPU count on the host twice an update and copied it to the device once per
    dtype group; here the count is a Python int and the decay a Python number given to the kernel."""
    net = network()
    average = ExponentialAverage(net, 0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    for step in range(3):
        train_step(net, optimizer, step)
        with Operators() as operators:
            average.update(net)
        seen.append(operators.seen)
    assert seen == [Counter({"aten._foreach_copy_": 1}),
                    Counter({"aten._foreach_lerp_": 1, "aten._foreach_copy_": 1}),
                    Counter({"aten._foreach_lerp_": 1, "aten._foreach_copy_": 1})]
    assert type(average.updates) is int and average.updates == 3


def test_a_state_written_by_averaged_model_loads_and_goes_on_as_it_would_have():
    net = network()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for step in range(3):
        train_step(net, optimizer, step)
        theirs.update_parameters(net)
    written = torch.load(io.BytesIO(saved(theirs.state_dict())), weights_only=True)  # as a checkpoint holds it
    ours = ExponentialAverage(network(), 0.9)
    ours.load_state_dict(written)
    assert ours.updates == 3 and all(torch.equal(a, written[f"module.{k}"]) for k, a in ours.module.state_dict().items())
    train_step(net, optimizer, 3)
    ours.update(net)
    theirs.update_parameters(net)
    after = theirs.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in ours.state_dict().items() if v.is_floating_point())


def test_a_state_of_another_network_or_without_its_count_is_refused_by_key():
    average = ExponentialAverage(network(), 0.9)
    state = average.state_dict()
    with pytest.raises(KeyError, match="no 'n_averaged'"):
        average.load_state_dict({k: v for k, v in state.items() if k != "n_averaged"})
    with pytest.raises(RuntimeError, match="Missing key.*\"5.bias\""):
        average.load_state_dict({k: v for k, v in state.items() if k != "module.5.bias"})
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialAverage(network(), 1.5)


def test_as_a_target_network_it_takes_no_gradients_and_follows_the_given_decay():
    """BYOL's target: the online network's average, updated after each step with the decay of the moment."""
    online = network()
    target = ExponentialAverage(online, 0.99)
    assert not any(p.requires_grad for p in target.module.parameters())
    assert all(p.requires_grad for p in online.parameters())
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    train_step(online, optimizer, 0)
    target.update(online)
    first = online[5].weight.clone()
    target.decay = 1.0  # the end of a schedule that rises to 1: the target stays where it is
    train_step(online, optimizer, 1)
    target.update(online)
    assert torch.equal(target.module[5].weight, first) and not torch.equal(online[5].weight, first)
    target.decay = 0.0  # the other end: the target is the online network
    target.update(online)
    assert torch.equal(target.module[5].weight, online[5].weight)
