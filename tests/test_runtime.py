"""The CUDA path's decisions, tested on CPU: precision per GPU generation, device choice per process,
the launch environment, a training step that reads nothing back to the host, channels_last, cuDNN
settings, the fp32 output layer, and resumes across GPU counts and precisions."""

import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dr_resnet.config import ConfigError
from dr_resnet.data.augment import DeviceAugment, epoch_generator
from dr_resnet.model.heads import build_head
from dr_resnet.model.resnet import build_resnet
from dr_resnet.training import checkpoint, components, distributed
from dr_resnet.training.distributed import (
    LaunchEnv,
    choose_gloo_interface,
    interface_of,
    launch_env,
    shared_gpus,
    tasks_per_node,
)
from dr_resnet.training.loop import EpochTotals, Execution, Trainer
from dr_resnet.training.runtime import DeviceError, Precision, compile_model, configure_backends, resolve_precision, select_device
from dr_resnet.training.train import main

from helpers import (
    REPO,
    preprocessed_dataset,
)

CUDA0 = torch.device("cuda", 0)


def fake_gpu(monkeypatch, capability=(8, 0), name="NVIDIA A100", count=1):
    """This process sees `count` GPUs of one kind (no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability,name,expected", [
    ((9, 0), "NVIDIA H100", torch.bfloat16), ((8, 0), "NVIDIA A100", torch.bfloat16),
    ((7, 5), "Tesla T4", torch.float16), ((7, 0), "Tesla V100", torch.float16)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, name, expected):
    fake_gpu(monkeypatch, capability, name)
    precision = resolve_precision("auto", CUDA0)
    assert precision.dtype == expected
    assert precision.needs_scaler == (expected == torch.float16)  # fp16 gets a GradScaler


def test_bf16_on_a_gpu_without_native_bf16_is_an_error_naming_the_key(monkeypatch):
    fake_gpu(monkeypatch, (7, 0), "Tesla V100")
    with pytest.raises(ConfigError, match=r"train.amp=bf16: Tesla V100 \(compute capability 7.0\) has no native bf16"):
        resolve_precision("bf16", CUDA0)
    with pytest.raises(ConfigError, match="--amp=bf16"):
        resolve_precision("bf16", CUDA0, key="--amp")
    assert resolve_precision("fp16", CUDA0).dtype == torch.float16
    assert resolve_precision("off", CUDA0).dtype is None
    assert resolve_precision("auto", torch.device("cpu")).dtype is None  # CPU: fp32


def test_device_choice_one_gpu_per_process(monkeypatch):
    fake_gpu(monkeypatch, count=4)
    assert select_device("auto", 2, 4) == torch.device("cuda", 2)
    assert select_device("cpu", 2, 4) == torch.device("cpu")  # gloo on CPU even on a GPU machine
    with pytest.raises(DeviceError) as error:
        select_device("auto", 0, 8)  # 8 processes, 4 GPUs: every rank of the node refuses at once
    assert "8 processes on this node but 4 GPU(s) visible" in str(error.value)
    assert "--nproc_per_node 4" in str(error.value) and "train.device=cpu" in str(error.value)
    with pytest.raises(DeviceError, match="5 processes on this node but 4 GPU"):
        select_device("cuda", 4, None)  # local rank 4 without a known local world size
    # One GPU visible: per-task GPU binding shows each task its own GPU as device 0.
    fake_gpu(monkeypatch, count=1)
    assert select_device("auto", 3, 4) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto", 0, 1) == torch.device("cpu")
    with pytest.raises(DeviceError, match="train.device=cuda but CUDA is not available"):
        select_device("cuda", 0, 1)


def test_processes_sharing_a_gpu_are_named_with_the_counts():
    assert shared_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")]) == ""
    message = shared_gpus([("n1", "GPU-a"), ("n1", "GPU-a"), ("n1", "GPU-a"), ("n2", "GPU-c")])
    assert "3 processes on n1 but 1 GPU(s) visible" in message and "--nproc_per_node 1" in message


def test_totals_restored_after_an_epochs_last_step_report_what_the_epoch_did():
    """A mid-epoch checkpoint can follow an epoch's last step; the resumed epoch then runs no step, and
    its row must still say how many steps were clipped."""
    totals = EpochTotals(torch.device("cpu"))
    for norm in (0.5, 3.0, 4.0):
        totals.add_grad_norm(torch.tensor(norm), 2.0, torch.tensor(True))
    resumed = EpochTotals(torch.device("cpu"))
    resumed.restore(totals.state())
    expected = totals.reduce(1.0)
    assert expected["clipped_share"] == 2 / 3 and resumed.reduce(1.0) == expected


def test_launch_environment():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_env(torchrun) == launch_env({**torchrun, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    e = launch_env(torchrun)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("torchrun", 3, 8, 1, 2)
    step = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}
    e = launch_env(step)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("srun", 5, 6, 1, 2)
    # A plain `python -m ...` in an sbatch script with --ntasks 4: the batch step has no SLURM_STEP_ID.
    batch = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}
    e = launch_env(batch)
    assert (e.launcher, e.world_size) == ("single", 1)
    assert "batch script, not by srun: its 4 tasks are not used" in e.describe()
    assert launch_env({}).describe() == "one process"
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("4") == [4]


def test_a_group_spanning_machines_gives_gloo_the_interface_towards_the_master(monkeypatch):
    """gloo binds to the address of this machine's hostname, which /etc/hosts often maps to a loopback
    address (127.0.0.1): unreachable from other nodes. A group spanning machines gets the interface that
    reaches MASTER_ADDR instead (the default route's when the master's name is loopback here); one machine, or a
    GLOO_SOCKET_IFNAME the user set, is left alone."""
    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.254") is None
    outward = distributed._source_address("192.0.2.1")
    if outward is None:
        pytest.skip("this machine has no default route")
    # choose_gloo_interface writes os.environ itself: a copy, so that nothing leaks into later tests (SLURM
    # jobs inherit this process's environment)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"})
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    choose_gloo_interface(LaunchEnv("torchrun", 0, 2, 0, 2))  # one machine
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    choose_gloo_interface(LaunchEnv("srun", 3, 4, 1, 2))  # two machines, the master's name loopback here
    assert os.environ["GLOO_SOCKET_IFNAME"] == interface_of(outward) != "lo"
    monkeypatch.setenv("MASTER_ADDR", socket.gethostname())
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    choose_gloo_interface(LaunchEnv("srun", 3, 4, 1, 2))
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"


class HostReads(TorchDispatchMode):
    """Counts the operators that on a GPU would make the host wait (a value read back) or copy host
    data up (a tensor built from Python numbers)."""

    WATCHED = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.is_nonzero", "aten.equal", "aten.allclose")

    def __init__(self) -> None:
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.WATCHED:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_trainer(head_kind: str, channels_last: bool = False, clip: float = 1.0, ema: float = 0.0) -> Trainer:
    torch.manual_seed(0)
    head = build_head(head_kind, torch.ones(5))
    model = build_resnet(18, head.outputs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), head,
                   Execution(torch.device("cpu"), Precision(), DeviceAugment(channels_last=channels_last)), clip,
                   ema=components.weight_average(model, ema))  # train.ema as train.build makes it


def batches(n: int, size: int = 32) -> list:
    g = torch.Generator().manual_seed(n)
    return [(torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("head_kind,ema", [("classification", 0.0), ("regression", 0.0), ("classification", 0.9)],
                         ids=["classification", "regression", "train.ema"])
def test_training_steps_read_nothing_back_and_build_no_tensor_from_host_numbers(head_kind, ema):
    """train.ema too: torch's AveragedModel, which it used before, read its count back twice a step."""
    trainer = tiny_trainer(head_kind, ema=ema)
    totals = EpochTotals(torch.device("cpu"), keep_outputs=True)
    trainer.run_steps(batches(1), epoch_generator(0, 0, 0), totals)  # first-call set-up (constants) aside
    with HostReads() as reads:
        trainer.run_steps(batches(3), epoch_generator(0, 1, 0), totals)
    assert reads.seen == Counter(), reads.seen
    if ema:
        assert trainer.ema.updates == 4  # every step moved the average
    stats = totals.reduce(seconds=1.0)  # the once-an-epoch reduction is where values come back
    assert stats["train_images"] == 16 and len(stats["outputs"]) == 16 and 0 <= stats["train_acc"] <= 1


def test_channels_last_reaches_the_first_convolution():
    trainer = tiny_trainer("classification", channels_last=True)
    layouts = []
    trainer.model.conv1.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.run_steps(batches(2), epoch_generator(0, 0, 0), EpochTotals(torch.device("cpu")))
    assert layouts == [True, True]
    images = batches(1)[0][0]
    nchw = DeviceAugment().train(images, epoch_generator(0, 0, 0))
    nhwc = DeviceAugment(channels_last=True).train(images, epoch_generator(0, 0, 0))
    assert not nchw.is_contiguous(memory_format=torch.channels_last) and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, nhwc)  # same values, other layout
    assert torch.equal(DeviceAugment().eval(images), DeviceAugment(channels_last=True).eval(images))


def test_output_layer_stays_fp32_under_autocast():
    torch.manual_seed(0)
    model = build_resnet(18, 1).eval()
    seen = []
    model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen == [torch.float32] and out.dtype == torch.float32
    # Not rounded to bf16's grid (steps of 1/64 to 1/128 on the grade scale).
    assert not torch.equal(out, out.to(torch.bfloat16).float())


def test_cudnn_settings_follow_the_switches():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        configure_backends(CUDA0, cudnn_benchmark=True, deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        configure_backends(CUDA0, cudnn_benchmark=False, deterministic=False)
        assert not torch.backends.cudnn.benchmark
        configure_backends(CUDA0, cudnn_benchmark=True, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def test_compiled_model_checkpoints_without_the_compile_prefix():
    trainer = tiny_trainer("classification")
    bare = trainer.model
    trainer.model = compile_model(bare, True, backend="eager")
    trainer.run_steps(batches(2), epoch_generator(0, 0, 0), EpochTotals(torch.device("cpu")))
    assert all(k.startswith("_orig_mod.") for k in trainer.model.state_dict())
    assert set(bare.state_dict()) == set(build_resnet(18).state_dict())  # what checkpoints hold
    assert compile_model(bare, False) is bare


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("runtime"), 24, 9, seed=5, size=32)


def run_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=32",
            "train.batch_size=8", "data.workers=0", "train.warmup_epochs=0", "train.device=cpu",
            f"output.dir={run_dir}", *extra]


def test_resume_ignores_cuda_rng_states_of_another_gpu_count(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert main(run_args(tiny, run_dir, "train.epochs=1")) == 0
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert set(state["rng"]) == {"torch"} and state["precision"] == "fp32"
    # As a 4-GPU run of an earlier version saved it: one CUDA generator state per GPU.
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(4)]
    checkpoint.save(state, run_dir / "checkpoint_last.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA RNG state was restored")
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state", refuse)
    assert main(run_args(tiny, run_dir, "train.epochs=2")) == 0
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert set(checkpoint.load(run_dir / "checkpoint_last.pt")["rng"]) == {"torch"}


def test_resume_under_another_precision_warns_and_continues(tiny, tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert main(run_args(tiny, run_dir, "train.epochs=1", "train.amp=off")) == 0
    # A requeued job on other hardware: fp32 -> fp16 (a fresh loss scale) -> fp32 (the scale is dropped).
    assert main(run_args(tiny, run_dir, "train.epochs=2", "train.amp=fp16")) == 0
    err = capfd.readouterr().err
    assert "was trained in fp32; this process runs in fp16" in err and "fresh fp16 loss scale" in err
    fp16 = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert fp16["precision"] == "fp16" and fp16["scaler"]["scale"] > 0
    assert main(run_args(tiny, run_dir, "train.epochs=3", "train.amp=off")) == 0
    assert "was trained in fp16; this process runs in fp32" in capfd.readouterr().err
    last = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert last["epoch"] == 3 and last["precision"] == "fp32" and last["scaler"] == {}


def test_only_the_training_loader_keeps_its_workers(tiny, tmp_path):
    from dr_resnet import config
    from dr_resnet.training.distributed import DistInfo
    from dr_resnet.training.train import build

    cfg = config.load(str(REPO / "configs" / "demo.yaml"),
                      run_args(tiny, tmp_path / "run")[2:] + ["data.workers=2", "data.val_fraction=0.3", "data.min_val_images=1",
                                                               "model.head=regression"])
    run = build(cfg, DistInfo())
    assert run.train_loader.persistent_workers and run.train_loader.num_workers == 2
    for loader in (run.test_loader, run.val_loader, run.fit_loader):
        assert loader.num_workers == 2 and not loader.persistent_workers


def test_cuda_asked_for_on_a_machine_without_it_is_one_clear_error(tiny, tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(run_args(tiny, tmp_path / "run", "train.device=cuda")) == 2
    assert "train.device=cuda but CUDA is not available" in capfd.readouterr().err
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_ddp_with_sync_batchnorm_does_not_broadcast_buffers(tmp_path):
    """The argument train.build passes DDP when SyncBatchNorm is on (its name changed across torch versions)."""
    import torch.distributed as dist

    from dr_resnet.training.components import no_buffer_broadcast

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        assert not torch.nn.parallel.DistributedDataParallel(model, **no_buffer_broadcast()).will_sync_module_buffers()
        assert torch.nn.parallel.DistributedDataParallel(model).will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_training_state_reads_earlier_checkpoints_and_refuses_other_files(tiny, tmp_path, capfd):
    from dr_resnet.training.evaluate import main as evaluate_main

    run_dir = tmp_path / "run"
    assert main(run_args(tiny, run_dir, "train.epochs=1")) == 0
    state = checkpoint.TrainingState.load(run_dir / "checkpoint_last.pt")
    assert state.epoch == 1 and state.precision == "fp32" and set(state.rng) == {"torch"}
    written = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert set(written) == {"model", "optimizer", "scheduler", "scaler", "precision", "epoch", "best", "rng",
                            "config", "wandb_id", "head", "position", "recipe", "provenance", "metrics", "ema"}
    # (exactly the keys checkpoint.py's docstring lists)
    assert written["position"] == {}  # written at the epoch's end
    old = {k: v for k, v in written.items()  # as version 0.1 wrote it
           if k not in ("precision", "head", "position", "recipe", "provenance", "metrics")}
    checkpoint.save(old, tmp_path / "old.pt")
    assert checkpoint.TrainingState.load(tmp_path / "old.pt").precision is None
    torch.save(written["model"], tmp_path / "weights.pt")
    with pytest.raises(checkpoint.CheckpointError, match="weights.pt: not a dr_resnet training checkpoint"):
        checkpoint.TrainingState.load(tmp_path / "weights.pt")
    assert evaluate_main(["--checkpoint", str(tmp_path / "weights.pt"), "--data-root", str(tiny), "--out",
                          str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"]) == 2
    assert "not a dr_resnet training checkpoint" in capfd.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path / "old.pt"), "--data-root", str(tiny), "--out",
                          str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"]) == 0


def test_a_skipped_non_finite_step_changes_no_weight_and_no_batchnorm_statistic():
    trainer = tiny_trainer("classification", clip=0.0)
    trainer.nonfinite = "skip"
    trainer.run_steps(batches(1), epoch_generator(0, 0, 0), EpochTotals(torch.device("cpu")))  # momentum set
    with torch.no_grad():
        trainer.model.fc.bias[0] = float("nan")  # every output, loss and gradient is now NaN
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    copies = [t.data_ptr() for t in trainer._statistics[1]]  # the statistics' copies, made at the first step
    totals = EpochTotals(torch.device("cpu"))
    trainer.run_steps(batches(2), epoch_generator(0, 1, 0), totals)
    after = trainer.model.state_dict()
    assert [t.data_ptr() for t in trainer._statistics[1]] == copies  # reused, not cloned again each step
    assert all(torch.equal(before[k], after[k]) for k in before if k != "fc.bias")
    assert torch.equal(before["fc.bias"].isnan(), after["fc.bias"].isnan())
    assert int(totals.nonfinite) == 2 and totals.first_nonfinite_step()[0] == 0 and float(totals.sums[2]) == 0
    assert trainer.scheduler.last_epoch == 3  # the schedule goes on: skipped steps still count as steps



def test_fp16_with_skip_puts_back_the_statistics_of_an_overflowing_forward_pass():
    """fp16 (GradScaler) and train.nonfinite=skip: a forward pass that overflows fp16 leaves NaN/inf
    BatchNorm statistics; they are put back, so later evaluations stay finite (CPU autocast in fp16)."""
    trainer = tiny_trainer("classification", clip=0.0)
    trainer.nonfinite = "skip"
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    trainer.execution = Execution(torch.device("cpu"), Precision(torch.float16), DeviceAugment())
    trainer.run_steps(batches(1), epoch_generator(0, 0, 0), EpochTotals(torch.device("cpu")))
    with torch.no_grad():
        trainer.model.conv1.weight.mul_(1e7)  # the first convolution now overflows fp16's range
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k or "tracked" in k}
    totals = EpochTotals(torch.device("cpu"))
    trainer.run_steps(batches(2), epoch_generator(0, 1, 0), totals)
    after = trainer.model.state_dict()
    assert int(totals.nonfinite) == 2 and all(torch.equal(before[k], after[k]) for k in before)


def _linear_with_grads(seed: int) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    return model, grads


def _step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, grads: list[torch.Tensor], skip: bool = False) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    if skip:  # what GradScaler (an fp16 overflow) and train.nonfinite=skip hand fused SGD
        optimizer.found_inf = torch.ones(())
        optimizer.step()
        del optimizer.found_inf
    else:
        optimizer.step()


def test_fused_sgd_after_a_skipped_first_step_equals_plain_sgd_after_one_step():
    """Fused SGD (CUDA's optimizer, also on CPU) whose first step is skipped: the weights after the next
    step are finite and equal plain SGD's single step (its momentum buffers start at zero, not uninitialised)."""
    from dr_resnet.training.components import sgd

    fused_model, grads = _linear_with_grads(0)
    plain_model, _ = _linear_with_grads(0)
    fused = sgd(fused_model.parameters(), 0.1, 0.9, 5e-4, fused=True)
    plain = sgd(plain_model.parameters(), 0.1, 0.9, 5e-4, fused=False)
    _step(fused, fused_model, grads[0], skip=True)
    _step(fused, fused_model, grads[1])
    _step(plain, plain_model, grads[1])
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Zeroed buffers change no update: two steps with and without them are equal bit for bit.
    reference, _ = _linear_with_grads(0)
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ours_model, _ = _linear_with_grads(0)
    ours = sgd(ours_model.parameters(), 0.1, 0.9, 5e-4, fused=False)
    for g in grads:
        _step(torch_sgd, reference, g)
        _step(ours, ours_model, g)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours_model.parameters()))


def test_an_optimizer_state_from_another_device_keeps_this_process_flags():
    """A CPU-written optimizer state (no fused flag) loaded into CUDA's fused SGD: the optimizer stays fused,
    so GradScaler's found_inf (fp16, nonfinite=skip) still works; a state without momentum gets zeros."""
    from dr_resnet.training.components import load_optimizer_state, sgd

    writer_model, grads = _linear_with_grads(1)
    writer = sgd(writer_model.parameters(), 0.1, 0.9, 5e-4, fused=False)
    _step(writer, writer_model, grads[0])
    model, _ = _linear_with_grads(1)
    optimizer = sgd(model.parameters(), 0.1, 0.9, 5e-4, fused=True)
    load_optimizer_state(optimizer, writer.state_dict())
    assert all(group["fused"] for group in optimizer.param_groups)
    _step(optimizer, model, grads[1], skip=True)  # a plain load_state_dict: "Expected ... found_inf to be None"
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()  # before any step: no buffers
    load_optimizer_state(optimizer, fresh)
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())


def test_a_mid_epoch_position_from_another_kind_of_device_goes_on_with_fresh_streams(caplog):
    """A CUDA-written mid-epoch position resumed on CPU (or the reverse): the generator states do not fit,
    so the epoch goes on with fresh augmentation streams and a warning; the running totals carry over.
    A checkpoint from before the device was recorded is tried, and falls back the same way."""
    from dr_resnet.training.checkpoint import EpochPosition
    from dr_resnet.training.distributed import DistInfo
    from dr_resnet.training.train import restore_ranks

    writer = EpochTotals(torch.device("cpu"))
    writer.images = 12
    cuda_stream = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # seed, offset
    for device in ("cuda", ""):
        position = EpochPosition(0, 3, 10, 1, 1, 12, 0.1, 5.0, [{"augment": cuda_stream, "totals": writer.state()}], device)
        generator, totals = epoch_generator(0, 0, 0), EpochTotals(torch.device("cpu"))
        with caplog.at_level("WARNING"):
            restore_ranks(EpochPosition.of(position.to_dict()), generator, totals, DistInfo())
        assert torch.equal(generator.get_state(), epoch_generator(0, 0, 0).get_state())  # fresh: the epoch's own
        assert totals.images == 12 and "fresh augmentation streams" in caplog.text
        caplog.clear()
    same = EpochPosition(0, 3, 10, 1, 1, 12, 0.1, 5.0, [{"augment": epoch_generator(5, 0, 0).get_state(),
                                                          "totals": writer.state()}], "cpu")
    generator = epoch_generator(0, 0, 0)
    restore_ranks(same, generator, EpochTotals(torch.device("cpu")), DistInfo())
    assert torch.equal(generator.get_state(), epoch_generator(5, 0, 0).get_state())  # the writer's stream


def test_a_schedule_resumed_on_another_process_count_goes_on_from_the_same_share_of_training():
    """4 -> 2 processes after epoch 10 of 30 (10 -> 20 steps an epoch): the cosine goes on from a third of
    the run and reaches 0 at the last step, as an uninterrupted run on either count would."""
    import math

    from dr_resnet.training.components import lr_lambda, move_schedule

    def scheduler(steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("cosine", 0, 30 * steps_per_epoch))

    four = scheduler(10)
    for _ in range(100):
        four.optimizer.step()
        four.step()
    two = scheduler(20)
    two.load_state_dict(four.state_dict())
    assert two.last_epoch == 100  # the writer's steps: a third of its run, a sixth of this one's
    assert move_schedule(two, 10, 20) and two.last_epoch == 200
    expected = 0.4 * 0.5 * (1 + math.cos(math.pi / 3))
    assert two.get_last_lr()[0] == pytest.approx(expected) and two.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    for _ in range(400):
        two.optimizer.step()
        two.step()
    assert two.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert not move_schedule(two, 30, 20)  # the same count of processes: nothing moves


def test_a_stop_signal_to_the_process_group_spares_the_evaluation_workers(tiny):
    """torchrun, SLURM and submitit signal the whole process group: an evaluation loader's worker that
    gets SIGTERM keeps serving batches, so the epoch ends and its checkpoint is written."""
    import signal
    import subprocess

    from dr_resnet.data.dataset import RetinopathyDataset
    from dr_resnet.training.components import evaluation_loader
    from dr_resnet.training.distributed import DistInfo

    loader = evaluation_loader(RetinopathyDataset(tiny, "test", image_size=32), 2, 1, DistInfo())
    batches = iter(loader)
    next(batches)  # the worker is up and has run its init
    # From another process, as torchrun's or SLURM's signal to the process group reaches it (a signal from
    # the training process itself is DataLoader ending its workers: they exit).
    subprocess.run(["kill", f"-{signal.SIGTERM.value}", str(batches._workers[0].pid)], check=True)
    rest = list(batches)
    assert sum(len(labels) for _, labels in rest) == len(loader.dataset) - 2


def test_data_workers_beyond_the_cpus_a_process_may_use_are_named_with_a_fit():
    from dr_resnet.training.runtime import cpu_shortfall, usable_cpus

    assert cpu_shortfall(8, 4, 36) == ""  # 4 GPUs x (8 workers + 1): the README's 36
    message = cpu_shortfall(8, 4, 8)  # train.sbatch's old default of 8 CPUs for such a node
    assert "data.workers=8 x 4 process(es)" in message and "want 36 CPUs" in message and "use 8" in message
    assert message.endswith("set data.workers=1")
    assert cpu_shortfall(2, 4, 3).endswith("set data.workers=0")
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def _gather_uneven(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from dr_resnet.training.distributed import gather_rows

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rows = 5 if rank == 0 else 3  # rank 0 carries the rows of an epoch begun by more processes
        gathered = gather_rows(torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * rank)
        torch.save(gathered, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_rows_gathered_from_ranks_that_hold_different_counts():
    """regression.fit_thresholds=batches after a mid-epoch resume on another number of processes: the
    ranks hold different numbers of outputs; every rank gets all of them, in rank order, nothing padded."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_gather_uneven, args=(f"{folder}/store", f"{folder}/out"), nprocs=2, start_method="spawn")
        expected = torch.cat([torch.arange(10.0).reshape(5, 2), torch.arange(6.0).reshape(3, 2) + 100])
        for rank in (0, 1):
            assert torch.equal(torch.load(f"{folder}/out.{rank}", weights_only=True), expected)


def test_sync_batchnorm_by_default_only_where_each_gpus_batch_is_small(caplog):
    """auto: SyncBatchNorm on 2+ GPUs below 16 images a GPU, not at 16 and above, never on CPU or one
    process, never with compile (a warning where the batch is small); true/false force it on GPUs (true
    also on one, the code path of many)."""
    from dr_resnet import config
    from dr_resnet.training.components import SYNC_BN_BELOW, sync_batchnorm

    def chosen(*overrides, world=4, cuda=True):
        return sync_batchnorm(config.load(None, list(overrides)).train, world, cuda)[0]

    assert config.load(None, []).train.sync_bn is None and SYNC_BN_BELOW == 16
    assert chosen("train.batch_size=8") and chosen("train.batch_size=15")
    assert not chosen("train.batch_size=16") and not chosen("train.batch_size=32")
    assert not chosen("train.batch_size=8", world=1) and not chosen("train.batch_size=8", cuda=False)
    assert chosen("train.batch_size=32", "train.sync_bn=true") and not chosen("train.batch_size=8", "train.sync_bn=false")
    assert not chosen("train.sync_bn=true", cuda=False) and chosen("train.sync_bn=true", world=1)
    with caplog.at_level("WARNING"):
        assert not chosen("train.batch_size=8", "train.compile=true")
    assert "8 images a GPU is below 16, where SyncBatchNorm would help, but train.compile=true" in caplog.text
    assert config.load(None, ["train.sync_bn=auto"]).train.sync_bn is None


def test_compile_with_sync_batchnorm_on_several_gpus_is_refused_naming_both_keys():
    from dr_resnet import config
    from dr_resnet.training.components import distributed_model
    from dr_resnet.training.distributed import DistInfo

    cfg = config.load(None, ["train.compile=true", "train.sync_bn=true"])
    gpus = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0), launcher="torchrun")
    with pytest.raises(ConfigError, match="train.compile=true with train.sync_bn=true on 2 GPU") as refused:
        distributed_model(torch.nn.BatchNorm2d(3), cfg, gpus)  # refused before any GPU is touched
    assert "train.sync_bn=false" in str(refused.value) and "train.compile=false" in str(refused.value)


def test_a_compiled_evaluation_pads_the_ragged_last_batch_to_one_shape():
    """fixed_batch (what a run with train.compile asks for): the model sees one batch shape, so a compiled
    graph is not recompiled for the short last batch, and every image's output is what it was unpadded."""
    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset

    from dr_resnet.training.loop import evaluate

    trainer = tiny_trainer("classification")
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 5, (10,), generator=g))
    loader = DataLoader(data, batch_size=4)
    shapes = []
    trainer.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    plain = evaluate(trainer.model, loader, trainer.head, trainer.execution)
    assert [s[0] for s in shapes] == [4, 4, 2]
    padded = evaluate(trainer.model, loader, trainer.head, trainer.execution, fixed_batch=True)
    assert [s[0] for s in shapes[3:]] == [4, 4, 4]
    assert np.array_equal(padded.targets, plain.targets) and len(padded.outputs) == 10
    assert np.allclose(padded.outputs, plain.outputs, atol=1e-6)
    assert np.array_equal(padded.confusion_matrix, plain.confusion_matrix)


def _boundaries(rank: int, store: str, out: str) -> None:
    import signal

    import torch.distributed as dist

    from dr_resnet.training.preemption import StepBoundary, StopSignals

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        seen = {}
        for scenario in ("clock and signal", "non-finite", "settle"):
            signals = StopSignals()  # not entered: the test sets what a handler would record
            boundary = StepBoundary(1e-9 if scenario == "clock and signal" else 0, signals, is_main=rank == 0)
            decisions = []
            for done in range(1, 7):
                if rank == 1 and done == 3 and scenario == "clock and signal":
                    signals.received = int(signal.SIGTERM)
                nonfinite = scenario == "non-finite" and rank == 1 and done >= 2
                decision = boundary.decide(nonfinite)
                decisions.append((done, decision.checkpoint, decision.stop_signal, decision.nonfinite))
                if decision.checkpoint:
                    boundary.checkpointed()
                if decision.stop_signal or decision.nonfinite:
                    break
                boundary.send(nonfinite)
                if scenario == "settle" and done == 3:
                    break
            if scenario == "settle":  # the flags of boundary 3 in flight; a signal comes to rank 1 after them
                signals.received = int(signal.SIGTERM) if rank == 1 else None
                settled = boundary.settle()
                decisions.append(("settled", settled.checkpoint, settled.stop_signal, settled.nonfinite))
            seen[scenario] = decisions
        torch.save(seen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_step_decision_of_two_processes_arrives_one_step_later_and_agrees():
    """2+ processes: the flags sent after step k are acted on after step k + 1 by every rank alike; a
    checkpoint can still follow every step (the clock's flag is read after the checkpoint it asked for);
    settle() at an epoch's end waits for every rank's flags now."""
    import signal
    import tempfile

    import torch.multiprocessing as mp

    term = int(signal.SIGTERM)
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_boundaries, args=(f"{folder}/store", f"{folder}/out"), nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{folder}/out.{rank}", weights_only=False) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    seen = ranks[0]
    # Rank 0's clock is due at every boundary; rank 1's signal comes at boundary 3 and stops both after 4.
    assert seen["clock and signal"] == [(1, False, None, False), (2, True, None, False), (3, True, None, False),
                                        (4, True, term, False)]
    assert seen["non-finite"] == [(1, False, None, False), (2, False, None, False), (3, False, None, True)]
    assert seen["settle"] == [(1, False, None, False), (2, False, None, False), (3, False, None, False),
                              ("settled", True, term, False)]


def test_one_process_decides_at_each_boundary_on_its_own_flags():
    import signal

    from dr_resnet.training.preemption import StepBoundary, StopSignals

    signals = StopSignals()
    boundary = StepBoundary(0, signals, is_main=True)
    decision = boundary.decide()
    assert not decision.checkpoint and decision.stop_signal is None and not decision.nonfinite
    assert boundary.decide(nonfinite_seen=True).nonfinite
    signals.received = int(signal.SIGUSR1)
    assert boundary.decide().stop_signal == signal.SIGUSR1 and boundary.decide().checkpoint


def _skip_on_one_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        trainer = tiny_trainer("classification", clip=0.0)
        trainer.model = DistributedDataParallel(trainer.model)
        trainer.nonfinite = "skip"
        loss = trainer.head.loss
        # Rank 1's loss is infinite while its gradients stay finite (a constant added to the loss).
        trainer.head.loss = (lambda o, y: loss(o, y) + float("inf")) if rank == 1 else loss
        totals = EpochTotals(torch.device("cpu"), keep_outputs=True)
        trainer.run_steps(batches(2, 16)[rank:rank + 1], epoch_generator(0, 0, rank), totals)
        torch.save({"params": [p.detach().clone() for p in trainer.model.module.parameters()],
                    "nonfinite": int(totals.nonfinite)}, f"{out}.{rank}")
        # A rank that had no step at all: the epoch's reduction still gathers every rank's outputs.
        empty = EpochTotals(torch.device("cpu"), keep_outputs=True)
        if rank == 0:
            empty.add(0, torch.tensor(1.0), torch.ones(3, 5), torch.tensor([1, 2, 3]), torch.tensor(1), torch.tensor(True))
        stats = empty.reduce(seconds=1.0)
        torch.save({"outputs": torch.from_numpy(stats["outputs"]), "labels": torch.from_numpy(stats["labels"])},
                   f"{out}.gathered.{rank}")
    finally:
        dist.destroy_process_group()


def test_skip_mode_decides_on_all_reduced_values_and_an_empty_rank_gathers():
    """train.nonfinite=skip with 2 gloo processes, rank 1's loss infinite and its gradients finite: both
    ranks take the step (the all-reduced gradient decides), so the replicas stay equal; rank 1 still counts
    its step as non-finite. And a rank with no steps in an epoch gathers the others' outputs."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_skip_on_one_rank, args=(f"{folder}/store", f"{folder}/out"), nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{folder}/out.{r}", weights_only=True) for r in (0, 1)]
        start = tiny_trainer("classification").model.parameters()
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
        assert not all(torch.equal(a, s) for a, s in zip(ranks[0]["params"], start))  # the step was taken
        assert [r["nonfinite"] for r in ranks] == [0, 1]
        for r in (0, 1):
            gathered = torch.load(f"{folder}/out.gathered.{r}", weights_only=True)
            assert torch.equal(gathered["outputs"], torch.ones(3, 5)) and gathered["labels"].tolist() == [1, 2, 3]


def _agree(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from dr_resnet.training.components import agreed, execution

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        own = execution("bf16" if rank == 0 else "off", torch.device("cpu"))  # as amp=auto on two GPU kinds would
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"{own.precision.name} {agreed(own, rank == 0).precision.name}")
    finally:
        dist.destroy_process_group()


def test_ranks_that_chose_different_precisions_all_run_the_most_conservative():
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_agree, args=(f"{folder}/store", f"{folder}/out"), nprocs=2, start_method="spawn")
        assert [open(f"{folder}/out.{r}").read() for r in (0, 1)] == ["bf16 fp32", "fp32 fp32"]
    from dr_resnet.training.runtime import CONSERVATIVE

    assert min(["bf16", "fp16"], key=CONSERVATIVE.index) == "fp16"  # a GPU without native bf16 runs fp16


def test_the_share_of_an_epoch_spent_waiting_for_data_is_measured():
    """data_wait_share (metrics.jsonl, W&B): the host's wait for the loader over the epoch's time, what
    tells whether the GPU starves for data (more data.workers, more CPUs per GPU) or not."""
    import time

    def slow(batches_, wait: float):
        for batch in batches_:
            time.sleep(wait)  # a loader that decodes slowly
            yield batch

    trainer = tiny_trainer("classification")
    started = time.perf_counter()
    fast = trainer.epoch(batches(3), epoch_generator(0, 0, 0))
    step = (time.perf_counter() - started) / 3  # about 0.3 s here; more on a loaded machine
    starved = trainer.epoch(slow(batches(3), max(1.0, 3 * step)), epoch_generator(0, 1, 0))  # waits 3x a step
    assert 0 <= fast["data_wait_share"] < 0.2 and starved["data_wait_share"] > 0.5
    assert starved["data_wait_share"] <= 1
