"""The GPU tier: what only a real CUDA device can show. `pytest -m gpu` (or `make gpu-check`) on a
machine with one GPU or more; without CUDA every test here is skipped with one reason line.

bf16 and fp16 steps, a training step that never waits for the host (CUDA's sync debug mode set to
error; train.ema's average too), channels_last at conv1, a one-GPU torchrun run (NCCL, SyncBatchNorm,
AMP) that resumes and whose checkpoint gives the same predictions on CPU, torch.compile, two processes on
one GPU refused with the counts, and on 2+ GPUs the host waits of a DDP step with and without
SyncBatchNorm, and with train.ema."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dr_resnet.data.augment import DeviceAugment, epoch_generator
from dr_resnet.model.heads import build_head
from dr_resnet.model.resnet import build_resnet
from dr_resnet.training import checkpoint
from dr_resnet.training.components import weight_average
from dr_resnet.training.loop import EpochTotals, Execution, ShardSampler, Trainer, evaluate
from dr_resnet.training.runtime import Precision, native_bf16, resolve_precision

from helpers import REPO, preprocessed_dataset

pytestmark = pytest.mark.gpu  # without CUDA, conftest.py skips every test so marked, with one reason

CUDA = torch.device("cuda", 0)


def gpu_trainer(head_kind: str, dtype: torch.dtype, clip: float = 1.0, ema: float = 0.0) -> Trainer:
    """The training step as train.build assembles it on CUDA: channels_last, fused SGD, fp16's scaler,
    train.ema's weight average (with `ema` > 0)."""
    torch.manual_seed(0)
    head = build_head(head_kind, device=CUDA)
    model = build_resnet(18, head.outputs).to(CUDA).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    precision = Precision(dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
    return Trainer(model, optimizer, scheduler, scaler, head, Execution(CUDA, precision, DeviceAugment(channels_last=True)), clip,
                   ema=weight_average(model, ema))


def pinned_batches(n: int, size: int = 128, batch: int = 16) -> list:
    g = torch.Generator().manual_seed(n)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).pin_memory(),
             torch.randint(0, 5, (batch,), generator=g).pin_memory()) for _ in range(n)]


def test_auto_precision_on_this_gpu():
    expected = torch.bfloat16 if torch.cuda.get_device_capability(CUDA) >= (8, 0) else torch.float16
    assert resolve_precision("auto", CUDA).dtype == expected and native_bf16(CUDA) == (expected == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_steps_have_finite_losses(dtype):
    if dtype == torch.bfloat16 and not native_bf16(CUDA):
        pytest.skip("this GPU has no native bf16")
    trainer = gpu_trainer("classification", dtype)
    totals = EpochTotals(CUDA)
    trainer.run_steps(pinned_batches(6), epoch_generator(0, 0, 0, CUDA), totals)
    stats = totals.reduce(seconds=1.0)
    assert np.isfinite(stats["train_loss"]) and stats["train_images"] == 96
    assert trainer.scaler.is_enabled() == (dtype == torch.float16)
    if dtype == torch.float16:
        assert trainer.scaler.get_scale() > 0


@pytest.mark.parametrize("head_kind,dtype,ema", [
    ("classification", torch.bfloat16, 0.0), ("regression", torch.bfloat16, 0.0), ("classification", torch.float16, 0.0),
    ("classification", torch.bfloat16, 0.999)], ids=["cls-bf16", "reg-bf16", "cls-fp16", "cls-bf16-ema"])
def test_training_steps_never_wait_for_the_host(head_kind, dtype, ema):
    """train.ema too (cls-bf16-ema): its average's update is foreach kernels with a count kept in Python."""
    if dtype == torch.bfloat16 and not native_bf16(CUDA):
        pytest.skip("this GPU has no native bf16")
    from tqdm import tqdm

    trainer = gpu_trainer(head_kind, dtype, ema=ema)
    totals = EpochTotals(CUDA, keep_outputs=head_kind == "regression")
    trainer.run_steps(pinned_batches(3), epoch_generator(0, 0, 0, CUDA), totals)  # warm-up: cuDNN, allocator
    torch.cuda.synchronize()
    bar = tqdm(total=10 ** 6, file=io.StringIO(), disable=False)
    torch.cuda.set_sync_debug_mode("error")
    try:  # with the progress bar's loss display on every step
        trainer.run_steps(pinned_batches(5), epoch_generator(0, 1, 0, CUDA), totals, progress=bar, log_every=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert totals.reduce(seconds=1.0)["train_images"] == 128
    if ema:
        assert trainer.ema.updates == 8  # the warm-up's 3 steps and the 5 watched moved the average


def test_a_skipped_non_finite_step_is_left_out_on_the_device():
    """train.nonfinite=skip on CUDA: fused SGD reads the step's flag on the device (no host sync), and
    neither the weights nor the BatchNorm statistics move."""
    trainer = gpu_trainer("classification", torch.bfloat16, clip=0.0)
    trainer.nonfinite = "skip"
    trainer.run_steps(pinned_batches(2), epoch_generator(0, 0, 0, CUDA), EpochTotals(CUDA))
    with torch.no_grad():
        trainer.model.fc.bias[0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    totals = EpochTotals(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.run_steps(pinned_batches(3), epoch_generator(0, 1, 0, CUDA), totals)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "fc.bias")
    assert int(totals.nonfinite) == 3 and float(totals.sums[2]) == 0


def test_channels_last_reaches_the_first_convolution_in_the_built_run(tmp_path, tiny):
    from dr_resnet import config
    from dr_resnet.training.distributed import DistInfo
    from dr_resnet.training.train import build

    cfg = config.load(None, [f"data.root={tiny}", "data.image_size=64", "train.batch_size=8", "data.workers=0",
                             "train.device=cuda", f"output.dir={tmp_path / 'run'}"])
    run = build(cfg, DistInfo(device=CUDA))
    layouts = []
    run.model.conv1.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    stats = run.trainer.epoch(run.train_loader, epoch_generator(0, 0, 0, CUDA))
    assert layouts and all(layouts) and np.isfinite(stats["train_loss"])
    assert torch.backends.cudnn.benchmark  # train.cudnn_benchmark's default
    assert isinstance(run.trainer.optimizer, torch.optim.SGD) and run.trainer.optimizer.defaults["fused"]


def test_regression_output_is_not_rounded_by_bf16():
    if not native_bf16(CUDA):
        pytest.skip("this GPU has no native bf16")
    torch.manual_seed(0)
    model = build_resnet(18, 1).to(CUDA).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(64, 3, 64, 64, device=CUDA))
    assert out.dtype == torch.float32 and not torch.equal(out, out.bfloat16().float())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("gpu"), 64, 21, seed=8, size=64)


def run_training(nproc: int, data: Path, run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dr_resnet.train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}",
           "data.image_size=64", "train.batch_size=8", "data.workers=2", "train.device=cuda", "train.amp=auto",
           "train.sync_bn=true", f"output.dir={run_dir}", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def evaluate_cli(checkpoint_path: Path, data: Path, out: Path, device: str) -> dict:
    from dr_resnet.training.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(checkpoint_path), "--data-root", str(data), "--out", str(out),
                          "--device", device, "--amp", "off", "--workers", "0"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_one_gpu_torchrun_run_resumes_and_its_checkpoint_predicts_the_same_on_cpu(tiny, tmp_path):
    run_dir = tmp_path / "run"
    first = run_training(1, tiny, run_dir, "train.epochs=2")
    log = first.stderr
    assert "launch: torchrun: rank 0 of 1" in log and "device cuda:0" in log
    assert "SyncBatchNorm on: train.sync_bn=true on 1 GPU process(es)" in log
    expected = "bf16" if native_bf16(CUDA) else "fp16"
    assert f"precision {expected}" in log
    assert {"config.yaml", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "summary.json",
            "confusion_matrix.png"} <= {p.name for p in run_dir.iterdir()}
    second = run_training(1, tiny, run_dir, "train.epochs=3")
    assert "resumed" in second.stderr and "after epoch 2" in second.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["train_loss"]) for r in rows)
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert state["precision"] == expected and set(state["rng"]) == {"torch"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])

    # The same checkpoint, evaluated in fp32 on the GPU and on the CPU: the same grades, close outputs.
    on_gpu = evaluate_cli(run_dir / "checkpoint_last.pt", tiny, tmp_path / "gpu", "cuda")
    on_cpu = evaluate_cli(run_dir / "checkpoint_last.pt", tiny, tmp_path / "cpu", "cpu")
    assert on_gpu["device"] == "cuda:0" and on_cpu["device"] == "cpu"
    assert on_gpu["confusion_matrix"] == on_cpu["confusion_matrix"] and on_gpu["num_samples"] == 21
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)
    outputs = {}
    for device in (CUDA, torch.device("cpu")):
        head = build_head("classification", device=device)
        model = build_resnet(18, head.outputs).to(device)
        model.load_state_dict(state["model"])
        from dr_resnet.data.dataset import RetinopathyDataset
        dataset = RetinopathyDataset(tiny, "test", image_size=64)
        loader = DataLoader(dataset, 8, sampler=ShardSampler(len(dataset), 0, 1))
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            outputs[device.type] = evaluate(model, loader, head, Execution(device)).outputs
    np.testing.assert_allclose(outputs["cuda"], outputs["cpu"], atol=1e-4)


@pytest.mark.slow  # torch.compile: make gpu-check-full, not the quick tier
def test_compiled_training_resumes_with_plain_checkpoints(tiny, tmp_path):
    run_dir = tmp_path / "compiled"
    # train.sync_bn=true with compile is refused by the config: compile runs with SyncBatchNorm off.
    run_training(1, tiny, run_dir, "train.epochs=1", "train.compile=true", "train.sync_bn=false")
    second = run_training(1, tiny, run_dir, "train.epochs=2", "train.compile=true", "train.sync_bn=false")
    assert "resumed" in second.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["test_loss"]) for r in rows)
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert set(state["model"]) == set(build_resnet(18).state_dict())  # no _orig_mod. prefix


def test_more_processes_than_gpus_is_an_error_with_the_counts(tiny, tmp_path):
    gpus = torch.cuda.device_count()
    result = run_training(gpus + 1, tiny, tmp_path / "crowded", "train.epochs=1", check=False)
    assert result.returncode != 0
    assert f"{gpus + 1} processes on" in result.stderr and f"but {gpus} GPU(s) visible" in result.stderr
    assert "train.device=cpu" in result.stderr
    assert not (tmp_path / "crowded" / "checkpoint_last.pt").exists()


def test_predict_on_the_gpu_grades_as_the_cpu_and_draws_heat_maps(runs, photos, tmp_path):
    """predict --device cuda (bf16 autocast on recent GPUs, channels_last) against --device cpu (fp32)."""
    import csv
    import importlib.util

    from dr_resnet.serving.predict import main as predict_main

    cam = importlib.util.find_spec("captum") is not None  # the heat maps need captum; the grading does not
    images = [str(p) for p in sorted((photos / "raw" / "images").iterdir())[:16]]
    for device in ("cpu", "cuda"):
        args = ["--checkpoint", str(runs["ordinal"] / "checkpoint_best.pt"), "--images", *images, "--device", device,
                "--out", str(tmp_path / f"{device}.csv"), "--workers", "2"]
        assert predict_main(args + (["--cam", str(tmp_path / "cam")] if device == "cuda" and cam else [])) == 0
    rows = {d: list(csv.DictReader(open(tmp_path / f"{d}.csv"))) for d in ("cpu", "cuda")}
    p = {d: np.array([[float(r[f"p_grade{k}"]) for k in range(5)] for r in rows[d]]) for d in rows}
    assert np.abs(p["cpu"] - p["cuda"]).max() < 0.05  # bf16 rounding
    if not cam:
        pytest.skip("graded alike on CPU and GPU; the heat maps (--cam) need captum, not installed here")
    assert len(list((tmp_path / "cam").iterdir())) == 16


def test_fp16_fused_sgd_after_an_overflowing_first_step_equals_plain_sgd():
    """fp16's GradScaler skips a first step whose scaled gradients overflow (likely for ResNet50 from
    scratch at 512 px): fused SGD's next step must leave finite weights, equal to plain SGD's one step."""
    import copy

    from dr_resnet.training.components import sgd

    torch.manual_seed(0)
    model = build_resnet(18, 5).to(CUDA)
    reference = copy.deepcopy(model)
    images = torch.randn(8, 3, 64, 64, device=CUDA)
    labels = torch.randint(0, 5, (8,), device=CUDA)

    def step(network, optimizer, scaler) -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(network(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    fused = sgd(model.parameters(), 0.01, 0.9, 5e-4, fused=True)
    overflowing = torch.amp.GradScaler("cuda", init_scale=2.0**100, backoff_factor=2.0**-90)
    step(model, fused, overflowing)
    assert overflowing.get_scale() == 2.0**10  # the first step was skipped
    step(model, fused, overflowing)
    plain = sgd(reference.parameters(), 0.01, 0.9, 5e-4, fused=False)
    step(reference, plain, torch.amp.GradScaler("cuda", init_scale=2.0**10))
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("head", ["classification", "regression", "ordinal"])
def test_exports_made_on_the_cpu_grade_on_the_gpu(runs, photos, tmp_path, head, fmt):
    """An export made on the CPU, run with predict --device cuda: no device is baked into it."""
    if fmt == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX exports need onnxruntime")
        pytest.importorskip("onnx", reason="ONNX exports need onnx")
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu): an ONNX export runs on the CPU")
    from dr_resnet.serving.export import export
    from dr_resnet.serving.grading import load_grader

    path, _, _ = export(runs[head] / "checkpoint_best.pt", fmt, tmp_path / "out")
    images = torch.stack([load_grader(path, torch.device("cpu")).recipe.prepare(p)
                          for p in sorted((photos / "raw" / "images").iterdir())[:8]])
    on_cpu, on_gpu = load_grader(path, torch.device("cpu")).grade(images), load_grader(path, CUDA).grade(images)
    assert np.array_equal(on_cpu.grades, on_gpu.grades)
    assert np.abs(on_cpu.values - on_gpu.values).max() < 1e-3


def test_a_cpu_checkpoint_resumes_on_the_gpu_in_fp16_with_skip(tiny, tmp_path):
    """A run begun on the CPU goes on on the GPU (fused SGD, fp16's scaler, train.nonfinite=skip): the
    optimizer keeps this process's flags, and the epochs after the move are finite."""
    run_dir = tmp_path / "moved"
    run_training(1, tiny, run_dir, "train.epochs=1", "train.device=cpu")
    second = run_training(1, tiny, run_dir, "train.epochs=2", "train.amp=fp16", "train.nonfinite=skip")
    assert "resumed" in second.stderr and "precision fp16" in second.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["test_loss"]) for r in rows)


def test_host_syncs_per_step_on_two_gpus_with_and_without_sync_batchnorm(tmp_path):
    """2+ GPUs under torchrun: DDP's training step never makes the host wait without SyncBatchNorm (the
    default from 16 images a GPU), with train.ema's weight average too; PyTorch's SyncBatchNorm makes it
    wait in its forward. The counts go to $GPU_OUT/host_syncs.json when make gpu-check sets it."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    found = {}
    for name, sync_bn, ema in (("false", "false", "0"), ("false+ema", "false", "0.999"), ("true", "true", "0")):
        out = tmp_path / f"{name}.json"
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 str(REPO / "tests" / "gpu_host_syncs.py"), "--sync-bn", sync_bn, "--ema", ema,
                                 "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
        found[name] = json.loads(out.read_text())
    if os.environ.get("GPU_OUT"):
        Path(os.environ["GPU_OUT"], "host_syncs.json").write_text(json.dumps(found, indent=1))
    assert found["false"]["host_syncs"] == [0, 0]
    assert found["false+ema"]["host_syncs"] == [0, 0] and found["false+ema"]["ema_updates"] == 8
    assert all(count > 0 for count in found["true"]["host_syncs"])


def test_pretraining_on_the_gpu_runs_in_mixed_precision_channels_last_and_writes_its_backbone(tiny, tmp_path):
    """python -m dr_resnet.pretrain on one GPU: autocast (bf16 or fp16) and channels_last as training's, a finite
    loss, a healthy spread and the backbone file, with GPU-hours recorded."""
    import yaml

    from dr_resnet.pretraining.run import main

    run_dir = tmp_path / "pretrain"
    assert main([f"data.root={tiny}", "data.image_size=64", "data.workers=2", "train.device=cuda",
                 f"output.dir={run_dir}", "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.hidden_dim=256",
                 "pretrain.projection_dim=64"]) == 0
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())["effective"]
    assert effective["precision"] in ("bf16", "fp16")
    record = json.loads((run_dir / "backbone.json").read_text())
    assert record["device"] == "cuda" and record["gpu_hours"] > 0 and record["cpu_hours"] == 0
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["loss"]) and row["spread_x_sqrt_d"] > 0.1
