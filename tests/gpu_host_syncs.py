"""Run by tests/test_gpu.py under `torchrun --nproc_per_node 2` (2+ GPUs): counts the operations that make
the host wait for the GPU (CUDA's sync debug mode, set to warn) during training steps of ResNet18 under
DDP, with or without SyncBatchNorm, and with or without train.ema's weight average, built as
dr_resnet.train builds them. Rank 0 writes {"sync_bn": ..., "ema": ..., "steps": ..., "batchnorm_layers":
..., "host_syncs": ...} to the file given.

    torchrun --nproc_per_node 2 tests/gpu_host_syncs.py --sync-bn {true,false} [--ema DECAY] --out FILE
"""

import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist

from dr_resnet import config
from dr_resnet.data.augment import DeviceAugment, epoch_generator
from dr_resnet.model.heads import build_head
from dr_resnet.model.resnet import build_resnet
from dr_resnet.training.components import distributed_model, sgd, weight_average
from dr_resnet.training.distributed import init
from dr_resnet.training.loop import EpochTotals, Execution, Trainer
from dr_resnet.training.runtime import resolve_precision

STEPS = 5


def batches(n: int, seed: int, pin: bool) -> list:
    """What the training loader gives: uint8 images and grades, in pinned memory on a GPU machine."""
    g = torch.Generator().manual_seed(seed)
    made = [(torch.randint(0, 256, (16, 3, 128, 128), dtype=torch.uint8, generator=g),
             torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]
    return [(images.pin_memory(), labels.pin_memory()) for images, labels in made] if pin else made


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sync-bn", choices=["true", "false"], required=True)
    p.add_argument("--ema", type=float, default=0.0, help="train.ema's decay (0: off)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (CUDA counts no syncs there)")
    args = p.parse_args()
    cfg = config.load(None, [f"train.sync_bn={args.sync_bn}", "train.batch_size=16", f"train.device={args.device}",
                             f"train.ema={args.ema}"])
    info = init(args.device)
    try:
        cuda = info.device.type == "cuda"
        torch.manual_seed(0)
        head = build_head("classification", device=info.device)
        network = build_resnet(18, head.outputs).to(info.device).to(memory_format=torch.channels_last)
        ddp = distributed_model(network, cfg, info)
        network = getattr(ddp, "module", ddp)  # SyncBatchNorm's conversion makes a new module (train.build's order)
        optimizer = sgd(ddp.parameters(), 0.01, 0.9, 5e-4, fused=cuda)  # training's optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        precision = resolve_precision("auto", info.device)
        scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
        trainer = Trainer(ddp, optimizer, scheduler, scaler, head,
                          Execution(info.device, precision, DeviceAugment(channels_last=True)), 5.0,
                          ema=weight_average(network, cfg.train.ema))
        trainer.run_steps(batches(3, info.rank, cuda), epoch_generator(0, 0, info.rank, info.device),
                          EpochTotals(info.device))  # warm-up: NCCL, cuDNN, the allocator
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        # Made outside the counted window: their creation copies to the device once (not a step's cost).
        steps, generator, totals = batches(STEPS, 10 + info.rank, cuda), epoch_generator(0, 1, info.rank, info.device), \
            EpochTotals(info.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.run_steps(steps, generator, totals)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchronizing" in str(w.message) for w in caught)
        counts = [None] * info.world_size
        dist.all_gather_object(counts, syncs)
        if info.rank == 0:
            layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ddp.modules())
            with open(args.out, "w") as f:
                json.dump({"sync_bn": args.sync_bn == "true", "ema": cfg.train.ema, "steps": STEPS, "batchnorm_layers": layers,
                           "processes": info.world_size, "host_syncs": counts,
                           "ema_updates": trainer.ema.updates if trainer.ema is not None else 0,
                           "device": torch.cuda.get_device_name(info.device) if cuda else "cpu", "torch": torch.__version__}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
