"""Input-pipeline efficiency, side by side in one run, one torch thread.

1. Per-core data-worker throughput on preprocessed 512 px JPEGs: the lab's PIL pipeline (decode,
   RandomRotation, flips, ToTensor, Normalize per image) vs ours (decode to uint8; rotation, flips and
   normalisation happen batched on the device), plus what that device step costs per image on this CPU.
2. Training efficiency: images/s of a real `dr_resnet.train` epoch (1 process, 1 data worker) divided
   by the model's pure fwd+bwd+step images/s at the same batch and size.

    python bench/pipeline_efficiency.py [--images 64] [--train-images 256] [--size 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def time_loop(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def worker_throughput(root: Path, rounds: int = 3) -> None:
    from PIL import Image
    from torchvision import transforms as T

    from dr_resnet.data.augment import DeviceAugment, epoch_generator
    from dr_resnet.data.dataset import RetinopathyDataset

    dataset = RetinopathyDataset(root, "train")
    lab = T.Compose([T.RandomRotation(20), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def lab_item(i):
        with Image.open(dataset.paths[i]) as image:
            return lab(image.convert("RGB"))

    indices = list(range(len(dataset)))
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(time_loop(lab_item, indices))
        ours.append(time_loop(lambda i: dataset[i], indices))
    batch = torch.stack([dataset[i][0] for i in indices[:32]])
    augment, gen = DeviceAugment(), epoch_generator(0, 0, 0)
    start = time.perf_counter()
    for _ in range(3):
        augment.train(batch, gen)
    device_rate = 3 * len(batch) / (time.perf_counter() - start)
    print(f"[workers] {len(dataset)} preprocessed {dataset[0][0].shape[-1]} px JPEGs, 1 thread, best of {rounds}:")
    print(f"  lab PIL pipeline (decode + rotate + flips + normalise): {max(theirs):6.1f} images/s per core")
    print(f"  dr_resnet worker (decode to uint8):                     {max(ours):6.1f} images/s per core")
    print(f"  ratio: {max(ours) / max(theirs):.2f}x   (device-side rotate+flips+normalise on this CPU: "
          f"{device_rate:.0f} images/s, batch 32)")


def pure_model_rate(depth: int, batch: int, size: int, steps: int = 8) -> float:
    from dr_resnet.model.resnet import build_resnet

    model = build_resnet(depth).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()  # the first step warms up
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def training_efficiency(root: Path, run_dir: Path, size: int, batch: int) -> None:
    from dr_resnet.results.rundir import read_metrics
    from dr_resnet.training.train import main as train_main

    before = pure_model_rate(18, batch, size)
    code = train_main(["model.depth=18", f"data.root={root}", f"data.image_size={size}", "data.workers=1",
                       f"train.batch_size={batch}", "train.epochs=1", "train.warmup_epochs=0", "train.lr=0.01",
                       f"output.dir={run_dir}"])
    assert code == 0
    after = pure_model_rate(18, batch, size)
    pure = (before + after) / 2
    row = read_metrics(run_dir)[-1]
    train_images = row["images_per_s"] * row["train_seconds"]
    whole = train_images / row["epoch_seconds"]
    print(f"[training] resnet18, {size} px, batch {batch}, 1 process, 1 thread, 1 data worker:")
    print(f"  pure fwd+bwd+step: {pure:.1f} images/s (before {before:.1f}, after {after:.1f})")
    print(f"  training loop:     {row['images_per_s']:.1f} images/s -> ratio {row['images_per_s'] / pure:.3f}")
    print(f"  whole epoch incl. evaluation and checkpoint: {whole:.1f} images/s -> ratio {whole / pure:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="512 px images for the worker comparison")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    from dr_resnet.data.preprocess import Settings, preprocess
    from dr_resnet.data.synthetic import generate

    work = Path(tempfile.mkdtemp(prefix="bench_pipe_"))
    try:
        raw = generate(work / "raw512", {"train": args.images}, seed=2, size=600, workers=2, progress=False)
        preprocess(raw, work / "pre512", Settings(size=512), workers=2, progress=False)
        worker_throughput(work / "pre512")
        raw = generate(work / "raw", {"train": args.train_images, "test": args.train_images // 4}, seed=3,
                       size=2 * args.size, workers=2, progress=False)
        preprocess(raw, work / "pre", Settings(size=args.size), workers=2, progress=False)
        training_efficiency(work / "pre", work / "run", args.size, args.batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
