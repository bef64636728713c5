"""The linear probe (model.freeze_backbone) in dr_resnet.train's one training path: only the output
layer trains, at its own rate and without weight decay; a loaded backbone ends bit for bit as loaded; a
random backbone's BatchNorm statistics are re-estimated on the training images first, once, equal on
every rank."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dr_resnet import config
from dr_resnet.model.resnet import build_resnet
from dr_resnet.training import checkpoint
from dr_resnet.training.probe import reestimate_batchnorm
from dr_resnet.training.train import main

from helpers import REPO, demo_args, preprocessed_dataset

SIZE = 32
FC = ("fc.weight", "fc.bias")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """40 train / 13 test images at 32 px."""
    return preprocessed_dataset(tmp_path_factory.mktemp("tiny32"), 40, 13, seed=17, size=SIZE)


def probe_args(data: Path, run_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    """One epoch of a probe at 32 px, one process, at the rule's learning rate (train.lr=auto)."""
    return demo_args(data, run_dir, f"data.image_size={SIZE}", "model.freeze_backbone=true", "train.lr=auto", *extra,
                     epochs=epochs, workers=0)


def batchnorm_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A weights file ({"model": a ResNet18 state dict}, as model.weights reads a checkpoint) with BatchNorm
    statistics of its own (not 0/1) and a count of batches, so that any movement shows. Its output layer
    is there too (a fine-tuned model's), so that the probe's is seen to move from what was loaded."""
    torch.manual_seed(123)
    network = build_resnet(18, 5)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(77)
            module.bias.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("backbone") / "backbone.pt"
    torch.save({"model": network.state_dict()}, path)
    return path


def test_a_probe_of_a_loaded_backbone_trains_fc_alone_and_leaves_the_backbone_bit_for_bit(tiny, backbone, tmp_path,
                                                                                         capfd):
    run_dir = tmp_path / "probe"
    assert main(probe_args(tiny, run_dir, f"model.weights={backbone}", "train.ema=0.9")) == 0
    loaded = torch.load(backbone, weights_only=True)["model"]
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    assert state["model"].keys() == loaded.keys() == ema.keys()
    for key, value in loaded.items():  # weights, BatchNorm statistics and their counts, raw and averaged
        if key not in FC:
            assert torch.equal(state["model"][key], value), key
            assert torch.equal(ema[key], value), f"ema {key}"
    for key in FC:  # the output layer trained: it moved from the loaded one
        assert not torch.equal(state["model"][key], loaded[key]), key
    # the optimizer holds fc alone, without weight decay, at the probe's rate: 0.1 per 256 images, batch 8
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 1 and len(groups[0]["params"]) == 2 and groups[0]["weight_decay"] == 0.0
    assert groups[0]["initial_lr"] == pytest.approx(0.1 * 8 / 256)
    shapes = sorted(tuple(s["momentum_buffer"].shape) for s in state["optimizer"]["state"].values())
    assert shapes == [(5,), (5, 512)]
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())["effective"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for record in (effective, summary):
        assert record["probe"] is True and record["trained_parameters"] == "fc.weight, fc.bias"
        assert record["trained_parameter_count"] == 512 * 5 + 5
    rule = "0.1 x 8 / 256 (linear probe: fc.* only, weight decay 0, linear scaling)"
    assert effective["lr_rule"] == rule
    err = capfd.readouterr().err
    assert f"({rule})" in err and "kept as loaded" in err and "re-estimated" not in err


def test_a_full_run_trains_everything_with_weight_decay(tiny, tmp_path):
    run_dir = tmp_path / "full"
    assert main(probe_args(tiny, run_dir, "model.freeze_backbone=false")) == 0
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    network = build_resnet(18, 5)
    group = state["optimizer"]["param_groups"][0]
    assert len(group["params"]) == len(list(network.parameters())) and group["weight_decay"] == 5e-4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["probe"] is False and summary["trained_parameters"] == "all"
    assert summary["trained_parameter_count"] == sum(p.numel() for p in network.parameters())


def test_the_probes_rate_is_its_own_whatever_the_initialisation():
    for weights in ("none", "imagenet"):
        cfg = config.load(None, [f"model.weights={weights}", "model.freeze_backbone=true", "train.lr_base_probe=0.3"])
        lr = config.learning_rate(cfg.train, cfg.model.pretrained, 4, probe=cfg.model.freeze_backbone)
        assert lr.lr == pytest.approx(0.3 * 32 * 4 / 256) and "linear probe" in lr.rule and "weight decay 0" in lr.rule
    fixed = config.learning_rate(config.load(None, ["train.lr=0.02"]).train, False, 1, probe=True)
    assert fixed.lr == 0.02 and fixed.rule.endswith("weight decay 0")
    with pytest.raises(config.ConfigError, match="train.lr_base_probe must be > 0"):
        config.load(None, ["train.lr_base_probe=0"])


def test_a_random_backbones_probe_reestimates_its_statistics_once(tiny, tmp_path, capfd):
    """The statistics leave the initial 0/1 at the start, then stay (BatchNorm in eval mode) through the
    epochs; a resumed run keeps the checkpoint's and does not re-estimate."""
    run_dir = tmp_path / "random"
    assert main(probe_args(tiny, run_dir)) == 0
    assert "linear probe of a random backbone: its BatchNorm statistics re-estimated on the 40 training images" \
        in capfd.readouterr().err
    first = checkpoint.load(run_dir / "checkpoint_last.pt")["model"]
    buffers = batchnorm_buffers(first)
    assert len(buffers) == 2 * 20  # ResNet18: 20 BatchNorm layers
    for key, value in buffers.items():
        initial = torch.zeros_like(value) if key.endswith("mean") else torch.ones_like(value)
        assert not torch.allclose(value, initial), key
    # 40 images, evaluation batches of 16: 16, 16, 8, every one counted
    assert all(first[k].item() == 3 for k in first if k.endswith("num_batches_tracked"))
    assert main(probe_args(tiny, run_dir, epochs=2)) == 0
    assert "re-estimated" not in capfd.readouterr().err
    second = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert second["epoch"] == 2
    for key, value in first.items():
        if not key.startswith("fc."):
            assert torch.equal(second["model"][key], value), key


def batch_statistics(network: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's cumulative mean, over `batches`, of its input's per-channel batch mean and
    unbiased variance: the inputs caught by hooks in a train-mode pass of a copy, the statistics by hand."""
    network = copy.deepcopy(network).train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(name):
        def catch(module, inputs):
            x = inputs[0].double()
            seen.setdefault(name, []).append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)))
        return catch

    for name, module in network.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for x in batches:
            network(x)
    return {name: (torch.stack([m for m, _ in stats]).mean(0), torch.stack([v for _, v in stats]).mean(0))
            for name, stats in seen.items()}


def test_the_reestimated_statistics_are_the_cumulative_mean_of_the_batch_statistics():
    torch.manual_seed(5)
    network = build_resnet(18, 5).eval()
    images = torch.randn(11, 3, SIZE, SIZE) * torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1) + 0.3
    batches = [images[:4], images[4:8], images[8:10], images[10:]]  # the last, one image, is left out
    expected = batch_statistics(network, batches[:3])
    momenta = [m.momentum for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert reestimate_batchnorm(network, iter(batches)) == 3
    assert not network.training and [m.momentum for m in network.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    for name, module in network.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = expected[name]
            torch.testing.assert_close(module.running_mean, mean.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(module.running_var, var.float(), rtol=1e-4, atol=1e-5)
            assert module.num_batches_tracked.item() == 3
    # conv1's batch statistics by hand, without the network's hooks: bn1 normalises conv1's output
    by_hand = [network.conv1(x).double() for x in batches[:3]]
    torch.testing.assert_close(network.bn1.running_mean, torch.stack([c.mean(dim=(0, 2, 3)) for c in by_hand]).mean(0)
                               .float(), rtol=1e-4, atol=1e-5)


def _reestimate_on_a_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(5)
        network = build_resnet(18, 5)
        images = torch.randn(14, 3, SIZE, SIZE) + 0.2
        mine = [images[:4], images[4:8], images[8:10]] if rank == 0 else [images[10:12], images[12:14]]
        total = reestimate_batchnorm(network, mine)
        torch.save({"total": total, **batchnorm_buffers(network.state_dict()),
                    "count": network.bn1.num_batches_tracked.clone()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_end_with_equal_statistics_averaged_over_every_batch(tmp_path):
    """Rank 0 passes 3 batches, rank 1 two others: both end with the same statistics, the cumulative mean
    over all 5 batches (what one process passing them all gets)."""
    import torch.multiprocessing as mp

    mp.start_processes(_reestimate_on_a_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]["total"] == ranks[1]["total"] == 5
    for key in ranks[0]:
        if key != "total":
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    torch.manual_seed(5)
    alone = build_resnet(18, 5)
    images = torch.randn(14, 3, SIZE, SIZE) + 0.2
    assert reestimate_batchnorm(alone, [images[:4], images[4:8], images[8:10], images[10:12], images[12:14]]) == 5
    for key, value in batchnorm_buffers(alone.state_dict()).items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["count"].item() == 5


@pytest.mark.slow
def test_a_probe_trains_under_ddp_on_two_gloo_processes(tiny, tmp_path):
    """DDP with the backbone frozen, without find_unused_parameters: every trained parameter (fc) is used by
    every forward pass; the random backbone's statistics re-estimated over both ranks' shares."""
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dr_resnet.train", *probe_args(tiny, run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over 2 process(es)" in result.stderr
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    groups = state["optimizer"]["param_groups"]
    assert len(groups[0]["params"]) == 2 and groups[0]["initial_lr"] == pytest.approx(0.1 * 16 / 256)
    # 40 images shared out 20 and 20, evaluation batches of 16: 16 and 4 on each rank
    assert state["model"]["bn1.num_batches_tracked"].item() == 4
