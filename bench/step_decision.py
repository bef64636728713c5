"""What the stop/checkpoint decision at each step boundary costs the training loop, blocking (every rank
waits for one all-reduce of the flags after each step, as before) against lagged (the flags travel
during the next step; `preemption.StepBoundary`), side by side in one run.

W gloo processes on this machine each run `--steps` boundaries of a simulated step: the host sleeps
`--step-ms` (what a GPU run's host spends launching and waiting for work), plus, with `--jitter-ms J`, a
random 0-J ms on every rank every step (a data-loader hiccup, a garbage collection, a slow read). It
prints, per setting, the host time each boundary adds per step (wall time minus the time spent in the
steps' own sleeps, on the slowest rank) and the ratio blocking / lagged.

    python bench/step_decision.py [--processes 2 4] [--steps 400] [--step-ms 5] [--jitter-ms 0 2]

Across nodes, a blocking all-reduce also pays the network's round trips every step (gloo's ring: about
2 (W - 1) messages in sequence); the lagged one hides them behind the next step while they are shorter
than a step. This machine has one host and no `netem`, so that part is not measured here.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dr_resnet.training.preemption import StepBoundary, StopSignals


def _run(rank: int, world: int, store: str, steps: int, step_ms: float, jitter_ms: float, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        costs = {}
        for mode in ("blocking", "lagged", "blocking", "lagged"):  # twice each, interleaved: the second counts
            boundary = StepBoundary(0, StopSignals(), is_main=rank == 0)
            rng = random.Random(rank * 7919 + steps)
            slept = 0.0
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                began = time.perf_counter()
                time.sleep((step_ms + rng.uniform(0, jitter_ms)) / 1000)
                slept += time.perf_counter() - began
                if mode == "blocking":
                    boundary.settle()  # the old step boundary: one blocking all-reduce of every rank's flags
                else:
                    boundary.decide()
                    boundary.send()
            boundary.settle()
            costs[mode] = (time.perf_counter() - start - slept) / steps
        torch.save(costs, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure(world: int, steps: int, step_ms: float, jitter_ms: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_run, args=(world, f"{folder}/store", steps, step_ms, jitter_ms, f"{folder}/out"),
                           nprocs=world, start_method="spawn")
        per_rank = [torch.load(f"{folder}/out.{rank}", weights_only=True) for rank in range(world)]
    return {mode: max(costs[mode] for costs in per_rank) for mode in ("blocking", "lagged")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--jitter-ms", type=float, nargs="+", default=[0.0, 2.0])
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.steps} steps of {args.step_ms:g} ms per setting")
    print(f"{'processes':>9} {'jitter ms':>9} {'blocking us/step':>17} {'lagged us/step':>15} {'ratio':>6}")
    for world in args.processes:
        for jitter in args.jitter_ms:
            cost = measure(world, args.steps, args.step_ms, jitter)
            ratio = cost["blocking"] / cost["lagged"] if cost["lagged"] > 0 else float("inf")
            print(f"{world:>9} {jitter:>9g} {1e6 * cost['blocking']:>17.0f} {1e6 * cost['lagged']:>15.0f} {ratio:>6.1f}")


if __name__ == "__main__":
    main()
