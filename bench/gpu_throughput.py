"""GPU throughput, side by side in one run on one GPU: ResNet18 and ResNet50 at 512 px, batch 64,
bf16, channels_last, eager and torch.compile'd:

  (a) torchvision's model, pure fwd + bwd + SGD step on a batch already on the GPU
  (b) dr_resnet's model, the same                     target (b)/(a) >= 0.97
  (c) the real training loop: DataLoader over preprocessed JPEGs, data.workers decoders, pinned
      copies, device augmentation, the Trainer's step  target (c)/(b) >= 0.90 with 8 workers
  (d) peak GPU memory of (b) and (c)
  (e) images/s one CPU core decodes, and so how many cores one GPU needs
  compiled vs eager                                   target >= 1.1x

Under torchrun with 2+ GPUs it also times (b) with DDP: eager without SyncBatchNorm (the default from 16
images a GPU), eager with it, and compiled without it (what train.compile runs on several GPUs).

    python bench/gpu_throughput.py --data DIR [--depths 18,50] [--batch 64] [--workers 8] [--worker-sweep 4,8,16]
        [--steps 30] [--rounds 3] [--no-compile] [--out docs/gpu_throughput.md]

DIR is a preprocessed dataset at --size px with at least (warm-up + steps) x batch training images
(make gpu-check makes one: python -m dr_resnet.synthetic, then preprocess).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from dr_resnet import config
from dr_resnet.data.augment import epoch_generator
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.model.resnet import build_resnet
from dr_resnet.training.distributed import DistInfo
from dr_resnet.training.loop import EpochTotals
from dr_resnet.training.runtime import Stopwatch, configure_backends
from dr_resnet.training.train import build

CUDA = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # under torchrun: this process's GPU


def pure_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """fwd + bwd + fused SGD step on a fixed batch, bf16 autocast; images/s, the GPU's queue included."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    watch = Stopwatch(CUDA)
    for _ in range(steps):
        step()
    return steps * x.shape[0] / watch.seconds()


def peak_gib(fn) -> tuple[float, float]:
    """(fn's result, peak GPU memory in GiB while it ran)."""
    torch.cuda.reset_peak_memory_stats(CUDA)
    result = fn()
    return result, torch.cuda.max_memory_allocated(CUDA) / 2 ** 30


@dataclass
class Pure:
    torchvision: float
    ours: float
    peak: float


def pure_pair(depth: int, compiled: bool, batch: int, size: int, steps: int, rounds: int) -> tuple[Pure, torch.nn.Module]:
    """(a) and (b) in alternation, median of the rounds; the same weights and input for both."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=5)
    ours = build_resnet(depth, 5)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference = reference.to(CUDA, memory_format=torch.channels_last).train()
    ours = ours.to(CUDA, memory_format=torch.channels_last).train()
    if compiled:
        reference, ours = torch.compile(reference), torch.compile(ours)
    x = torch.randn(batch, 3, size, size, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,), device=CUDA)
    a, b = [], []
    for _ in range(rounds):
        a.append(pure_rate(reference, x, y, steps))
        b.append(pure_rate(ours, x, y, steps))
    _, peak = peak_gib(lambda: pure_rate(ours, x, y, 2))
    return Pure(statistics.median(a), statistics.median(b), peak), ours


def loop_rate(data: Path, depth: int, compiled: bool, batch: int, size: int, workers: int, steps: int,
              warmup: int, rounds: int = 3) -> tuple[float, float]:
    """(c): the training loop as dr_resnet.train builds it; (median images/s over `rounds` windows of `steps`
    batches, peak GiB). Untimed first: `warmup` batches (workers up, kernels chosen or compiled), then the
    batches the workers decoded meanwhile (prefetch_factor 2 each), so that no window is served from a queue
    filled before it began. Epochs follow one another as in training (the loader keeps its workers)."""
    cfg = config.load(None, [f"data.root={data}", f"data.image_size={size}", f"train.batch_size={batch}",
                             f"data.workers={workers}", f"model.depth={depth}", "train.device=cuda", "train.amp=bf16",
                             f"train.compile={str(compiled).lower()}", "output.dir=/tmp/dr_resnet_bench_unused"])
    run = build(cfg, DistInfo(device=CUDA))
    if len(run.train_loader) < 1:
        sys.exit(f"error: {data} has {len(run.train_loader.dataset)} training images: fewer than one batch of {batch}")

    def endless():
        for epoch in itertools.count():
            run.train_sampler.set_epoch(epoch)
            yield from run.train_loader

    batches = endless()
    generator = epoch_generator(0, 0, 0, CUDA)
    prefetched = 2 * workers  # DataLoader's default prefetch_factor per worker
    run.trainer.run_steps(itertools.islice(batches, warmup + prefetched), generator, EpochTotals(CUDA))

    def timed() -> float:
        rates = []
        for _ in range(rounds):
            watch = Stopwatch(CUDA)
            run.trainer.run_steps(itertools.islice(batches, steps), generator, EpochTotals(CUDA))
            rates.append(steps * batch / watch.seconds())
        return statistics.median(rates)

    return peak_gib(timed)


def decode_rate(data: Path, size: int, images: int = 300) -> float:
    """(e): images/s one core decodes to uint8 (what a data worker does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = RetinopathyDataset(data, "train", image_size=size)
        indices = range(min(images, len(dataset)))
        dataset[0]
        start = time.perf_counter()
        for i in indices:
            dataset[i]
        return len(indices) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def ddp_rates(depth: int, batch: int, size: int, steps: int, rounds: int, compiled: bool) -> dict[str, float] | None:
    """(b) under DDP across this torchrun's GPUs (images/s per GPU): eager without SyncBatchNorm (the
    default from 16 images a GPU), eager with it, and compiled without it (the configuration training
    compiles: train.compile refuses SyncBatchNorm); None in a world of one."""
    import torch.distributed as dist

    from dr_resnet.training.runtime import compile_model

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    rates = {}
    for name, sync, compile_it in (("eager", False, False), ("sync_bn", True, False), ("compiled", False, True)):
        if compile_it and not compiled:
            continue
        torch.manual_seed(0)
        model = build_resnet(depth, 5).to(CUDA, memory_format=torch.channels_last)
        if sync:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[CUDA.index], broadcast_buffers=not sync)
        x = torch.randn(batch, 3, size, size, device=CUDA).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (batch,), device=CUDA)
        rates[name] = statistics.median(pure_rate(compile_model(ddp, compile_it), x, y, steps) for _ in range(rounds))
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", required=True, help="preprocessed dataset (lab, kaggle or aptos layout)")
    p.add_argument("--depths", default="18,50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=8, help="data workers for (c)")
    p.add_argument("--worker-sweep", default="4,8,16", help="data workers to time (c) with, for ResNet18 eager")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU (make gpu-check on a GPU machine)", file=sys.stderr)
        return 2
    torch.cuda.set_device(CUDA)
    configure_backends(CUDA, cudnn_benchmark=True, deterministic=False)
    data = Path(args.data)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    capability = ".".join(map(str, torch.cuda.get_device_capability(CUDA)))
    lines = [f"GPU: {torch.cuda.get_device_name(CUDA)} (compute capability {capability}, "
             f"{torch.cuda.get_device_properties(CUDA).total_memory / 2 ** 30:.0f} GiB), {os.cpu_count()} CPU cores; "
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"torchvision {torchvision.__version__}",
             f"batch {args.batch} at {args.size} px, bf16 autocast, channels_last, fused SGD; medians of {args.rounds} "
             f"rounds x {args.steps} steps; (c) the median of {args.rounds} windows of {args.steps} batches, after "
             f"{args.warmup} warm-up batches and the batches the workers had decoded meanwhile", ""]
    lines += ["| model | mode | (a) torchvision img/s | (b) dr_resnet img/s | (b)/(a) | (c) loop img/s, "
              f"{args.workers} workers | (c)/(b) | (d) peak GiB (b) / (c) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    eager_b: dict[int, float] = {}
    for depth in (int(d) for d in args.depths.split(",")):
        for mode in modes:
            start = time.perf_counter()
            pure, _ = pure_pair(depth, mode == "compiled", args.batch, args.size, args.steps, args.rounds)
            loop, loop_peak = loop_rate(data, depth, mode == "compiled", args.batch, args.size, args.workers,
                                        args.steps, args.warmup, args.rounds)
            if mode == "eager":
                eager_b[depth] = pure.ours
            speedup = f" ({pure.ours / eager_b[depth]:.2f}x eager)" if mode == "compiled" else ""
            lines.append(f"| resnet{depth} | {mode} | {pure.torchvision:.0f} | {pure.ours:.0f}{speedup} | "
                         f"{pure.ours / pure.torchvision:.3f} | {loop:.0f} | {loop / pure.ours:.3f} | "
                         f"{pure.peak:.1f} / {loop_peak:.1f} |")
            print(lines[-1], f"  [{time.perf_counter() - start:.0f} s]", flush=True)
    lines += ["", f"(c) with other worker counts, resnet{min(eager_b)} eager:", "",
              "| data workers | (c) loop img/s | (c)/(b) |", "| --- | --- | --- |"]
    depth = min(eager_b)
    for workers in (int(w) for w in args.worker_sweep.split(",") if w):
        loop, _ = loop_rate(data, depth, False, args.batch, args.size, workers, args.steps, args.warmup, args.rounds)
        lines.append(f"| {workers} | {loop:.0f} | {loop / eager_b[depth]:.3f} |")
        print(lines[-1], flush=True)
    per_core = decode_rate(data, args.size)
    lines += ["", f"(e) one CPU core decodes {per_core:.0f} preprocessed {args.size} px JPEGs/s: one GPU needs "
              + ", ".join(f"{rate / per_core:.1f} cores for resnet{d} (eager)" for d, rate in sorted(eager_b.items()))
              + " (decoders only; add one for the training process)."]
    for d in eager_b:
        rates = ddp_rates(d, args.batch, args.size, args.steps, args.rounds, compiled=not args.no_compile)
        if rates is not None:
            lines.append(f"DDP over {os.environ['WORLD_SIZE']} GPUs, resnet{d}, (b) img/s per GPU: {rates['eager']:.0f} eager; "
                         f"{rates['sync_bn']:.0f} with SyncBatchNorm ({rates['sync_bn'] / rates['eager']:.3f})"
                         + (f"; {rates['compiled']:.0f} compiled ({rates['compiled'] / rates['eager']:.2f}x eager)"
                            if "compiled" in rates else ""))
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        lines.append("SyncBatchNorm: not timed (one GPU: it only costs across GPUs; run this under torchrun "
                     "--nproc_per_node N on N GPUs)")
    text = "\n".join(lines) + "\n"
    if rank0:
        print("\n" + text)
        if args.out:
            Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
