"""Model speed: dr_resnet's hand-written ResNets vs torchvision's, fwd+bwd images/s side by side.

Same weights, same input, same thread count; the two are timed in alternation and the median of
--repeats rounds is compared, so machine noise hits both alike.

    python bench/model_speed.py [--depths 18,50] [--batch 16] [--size 128] [--repeats 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from dr_resnet.model.resnet import build_resnet


def images_per_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="18,50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 5, (args.batch,))
    print(f"fwd+bwd, batch {args.batch}, {args.size}px, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} x {args.steps} steps")
    for depth in (int(d) for d in args.depths.split(",")):
        reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=5).train()
        ours = build_resnet(depth, 5).train()
        ours.load_state_dict(reference.state_dict(), strict=True)
        images_per_s(ours, x, y, 1), images_per_s(reference, x, y, 1)  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a.append(images_per_s(ours, x, y, args.steps))
            b.append(images_per_s(reference, x, y, args.steps))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"resnet{depth}: dr_resnet {ma:7.1f} img/s   torchvision {mb:7.1f} img/s   ratio {ma / mb:.3f}")


if __name__ == "__main__":
    main()
