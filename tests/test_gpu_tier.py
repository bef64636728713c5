"""The GPU tier (tests/test_gpu.py) checked from a CPU machine: it must run on the lent GPU machine as that
machine is (shared/notes/gpu-device.md), which has no wandb, submitit or captum and no package registry,
and its torchrun script (tests/gpu_host_syncs.py) must run at all."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

GPU_MACHINE_LACKS = ("wandb", "submitit", "captum")  # shared/notes/gpu-device.md: the lent machine has none of these
COLLECT_WITHOUT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]))
"""


def test_the_gpu_tier_collects_without_wandb_submitit_and_captum():
    """The lent GPU machine has no wandb, submitit or captum and no package registry: the tier must
    collect (and then skip only what needs them) there as it is."""
    done = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT.format(blocked=GPU_MACHINE_LACKS)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ERROR collecting" not in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert "tests collected" in done.stdout or "test collected" in done.stdout


@pytest.mark.slow
def test_the_host_sync_count_runs_with_train_ema(tmp_path):
    """tests/gpu_host_syncs.py counts CUDA's host waits on 2+ GPUs only; on CPU (gloo, two processes) it
    runs the same steps, train.ema's average included, so a rare GPU machine does not find it broken."""
    out = tmp_path / "syncs.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "gpu_host_syncs.py"), "--sync-bn", "false", "--ema", "0.999",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["ema"] == 0.999 and found["ema_updates"] == 8 and found["processes"] == 2
    assert found["host_syncs"] == [0, 0] and found["device"] == "cpu"
