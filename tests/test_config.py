import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from dr_resnet import config
from dr_resnet.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_dataclasses():
    cfg = config.load()
    assert dataclasses.replace(cfg, output=Config().output) == Config()  # output.dir: a new folder per run
    assert cfg.output.dir.startswith("runs/default-")
    assert cfg.train.lr is None and cfg.model.depth == 18 and cfg.wandb.mode == "disabled"
    # base.yaml writes the defaults out: loading it changes nothing but the data and output folders.
    base = config.load(CONFIGS / "base.yaml")
    assert base.train == Config().train and base.model == Config().model
    assert dataclasses.replace(base.data, root=Config().data.root, workers=4, image_size=512) == Config().data


@pytest.mark.parametrize("name,depth,weights,lr", [("resnet18_pretrained", 18, "imagenet", 0.01),
                                                   ("resnet18_scratch", 18, "none", 0.1),
                                                   ("resnet50_pretrained", 50, "imagenet", 0.01),
                                                   ("resnet50_scratch", 50, "none", 0.1)])
def test_the_four_runs_share_the_fair_recipe_with_their_initialisations_rate(name, depth, weights, lr):
    cfg = config.load(CONFIGS / f"{name}.yaml")
    assert (cfg.model.depth, cfg.model.weights, cfg.output.dir) == (depth, weights, f"runs/{name}")
    assert cfg.model.arm == name and cfg.model.pretrained == (weights != "none")
    # Everything but the initialisation is the same for the four runs.
    other = config.load(CONFIGS / "resnet18_scratch.yaml")
    assert (cfg.train, cfg.data) == (other.train, other.data)
    assert config.learning_rate(cfg.train, cfg.model.initialisation, processes=8).lr == pytest.approx(lr)  # 8 x 32 = 256


@pytest.mark.parametrize("written", ["scratch", "Scratch", "none", "NONE", " none ", ""])
def test_every_spelling_of_scratch_is_scratch_everywhere(written):
    from launch.sweep import missing_weights

    cfg = config.load(None, [f"model.weights={written}"])
    assert cfg.model.weights == "none" and not cfg.model.pretrained and cfg.model.arm == "resnet18_scratch"
    assert missing_weights(cfg) == ""  # the sweep runs it (it marked "scratch" NOT RUN: "weights file not found")
    assert config.load(None, ["model.weights=ImageNet"]).model.weights == "imagenet"
    assert config.load(None, ["model.weights=w/r50.pt"]).model.weights == "w/r50.pt"


def backbone_file(folder: Path, initialisation: str | None, name: str = "backbone.pt") -> Path:
    """A backbone file's path with the sidecar pretrain writes beside it (the .pt itself is not read here:
    the rule is torch-free); initialisation None: a sidecar without one."""
    path = folder / name
    path.write_bytes(b"")
    record = {"method": "byol", "epochs": 3, "gpu_hours": 0.5, "finished": True}  # pretraining/run.py's record
    if initialisation is not None:
        record["initialisation"] = initialisation
    path.with_suffix(".json").write_text(json.dumps(record))
    return path


def test_the_initialisation_is_none_scratch_imagenet_pretrained_and_a_backbones_own_by_its_sidecar(tmp_path):
    """The one rule (config.recorded_initialisation) names the arm, its learning rate and its record: a file
    with a sidecar is what the sidecar says; a file of unknown origin reads as ImageNet-like, as before."""
    ssl = backbone_file(tmp_path, "ssl")
    both = backbone_file(tmp_path, "imagenet+ssl", "both.pt")
    unknown = tmp_path / "someones_weights.pth"
    unknown.write_bytes(b"")
    undeclared = backbone_file(tmp_path, None, "undeclared.pt")  # a .json beside it without "initialisation"
    cases = {"none": "scratch", "scratch": "scratch", "imagenet": "pretrained", "ImageNet": "pretrained", str(ssl): "ssl",
             str(both): "imagenet+ssl", str(unknown): "pretrained", str(undeclared): "pretrained",
             str(tmp_path / "not_there.pt"): "pretrained"}
    assert {w: config.recorded_initialisation(w) for w in cases} == cases
    assert config.INITIALISATIONS == ("scratch", "pretrained", "ssl", "imagenet+ssl")
    arms = {w: config.load(None, [f"model.weights={w}", "model.depth=50"]).model for w in ("none", "imagenet", ssl, both)}
    assert [m.arm for m in arms.values()] == ["resnet50_scratch", "resnet50_pretrained", "resnet50_ssl",
                                              "resnet50_imagenet+ssl"]
    assert [m.pretrained for m in arms.values()] == [False, True, True, True]  # whether it loads weights
    # what the run records: the initialisation, and a backbone's pretraining record
    assert config.initialisation_record(str(ssl)) == {"initialisation": "ssl", "pretraining": {
        "method": "byol", "epochs": 3, "gpu_hours": 0.5, "finished": True, "initialisation": "ssl"}}
    assert config.initialisation_record("imagenet") == {"initialisation": "pretrained"}
    assert config.initialisation_record(str(unknown)) == {"initialisation": "pretrained"}
    # a sidecar that cannot be read, or names no known initialisation: one line naming the file
    ssl.with_suffix(".json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"{ssl.with_suffix('.json')}: the record beside model.weights=")):
        config.recorded_initialisation(str(ssl))
    both.with_suffix(".json").write_text(json.dumps({"initialisation": "simclr"}))
    with pytest.raises(ConfigError, match=r"initialisation 'simclr' is not one of scratch, pretrained, ssl, imagenet\+ssl"):
        config.load(None, [f"model.weights={both}"]).model.arm


def test_the_learning_rate_rule_follows_the_initialisation(tmp_path):
    """scratch: lr_base_scratch; pretrained (ImageNet): lr_base_pretrained; ssl and imagenet+ssl: lr_base_ssl;
    the rule's text names the initialisation; a name outside INITIALISATIONS is refused."""
    train = config.load(None, ["train.batch_size=32", "train.lr_base_scratch=0.2", "train.lr_base_pretrained=0.02",
                               "train.lr_base_ssl=0.03"]).train
    found = {init: config.learning_rate(train, init, 4) for init in config.INITIALISATIONS}
    assert {init: lr.lr for init, lr in found.items()} == pytest.approx(
        {"scratch": 0.1, "pretrained": 0.01, "ssl": 0.015, "imagenet+ssl": 0.015})  # x 128 / 256
    assert found["ssl"].rule == "0.03 x 128 / 256 (ssl, linear scaling)"
    assert found["imagenet+ssl"].rule == "0.03 x 128 / 256 (imagenet+ssl, linear scaling)"
    assert Config().train.lr_base_ssl == 0.01  # ImageNet fine-tuning's, a starting point for --tune
    with pytest.raises(ValueError, match=r"initialisation must be one of scratch, pretrained, ssl, imagenet\+ssl, got True"):
        config.learning_rate(train, True, 4)
    with pytest.raises(ConfigError, match="train.lr_base_ssl must be > 0, got 0.0"):
        config.load(None, ["train.lr_base_ssl=0"])
    # the arm's own rate, from its weights: a backbone with an ssl sidecar gets lr_base_ssl
    cfg = config.load(None, [f"model.weights={backbone_file(tmp_path, 'ssl')}", "train.batch_size=32"])
    assert config.learning_rate(cfg.train, cfg.model.initialisation, 8).lr == pytest.approx(0.01)


def test_the_lab_recipe_is_kept_for_reproduction():
    lab = config.load(CONFIGS / "lab.yaml")
    assert (lab.train.lr, lab.train.scheduler, lab.train.sampler, lab.train.clip_grad_norm) == (1e-3, "none", "random", 0.0)
    assert (lab.model.zero_init_residual, lab.data.max_rotation, lab.data.val_fraction) == (False, 20.0, 0.0)
    for processes in (1, 4, 8):  # a fixed rate: the same whatever the batch
        assert config.learning_rate(lab.train, "scratch", processes).lr == 1e-3


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_learning_rate_rule_scales_with_the_global_batch(processes):
    cfg = config.load(CONFIGS / "resnet18_scratch.yaml", ["train.batch_size=16"])
    scratch = config.learning_rate(cfg.train, "scratch", processes)
    pretrained = config.learning_rate(cfg.train, "pretrained", processes)
    assert scratch.global_batch == pretrained.global_batch == 16 * processes
    assert scratch.lr == pytest.approx(0.1 * 16 * processes / 256) and pretrained.lr == pytest.approx(scratch.lr / 10)
    assert scratch.rule == f"0.1 x {16 * processes} / 256 (scratch, linear scaling)"
    assert pretrained.rule == f"0.01 x {16 * processes} / 256 (pretrained, linear scaling)"
    # The rate per image is the recipe: it does not change with the number of processes.
    assert scratch.lr / scratch.global_batch == pytest.approx(0.1 / 256)
    # The demo's short schedule: the same rule at 4x the base rates (0.05 from scratch on its 2 processes).
    demo = config.load(CONFIGS / "demo.yaml").train
    assert config.learning_rate(demo, "scratch", processes).lr == pytest.approx(4 * scratch.lr)
    assert config.learning_rate(demo, "pretrained", processes).lr == pytest.approx(4 * pretrained.lr)
    fixed = config.learning_rate(config.load(CONFIGS / "demo.yaml", ["train.lr=0.02"]).train, "scratch", processes)
    assert fixed.lr == 0.02 and fixed.rule.startswith("train.lr (fixed")
    assert config.load(CONFIGS / "demo.yaml", ["train.lr=0.02", "train.lr=auto"]).train.lr is None


def test_kappa_recipe_combines_the_options():
    cfg = config.load(CONFIGS / "resnet50_pretrained_kappa.yaml")
    assert (cfg.model.depth, cfg.model.weights, cfg.model.head) == (50, "imagenet", "regression")
    assert cfg.regression.fit_thresholds == "train" and cfg.data.val_fraction == 0.1
    # The fair recipe underneath, but for the clip the regression head was measured with (issue 30).
    fair = config.load(CONFIGS / "resnet50_pretrained.yaml").train
    assert cfg.train.clip_grad_norm == 1.0 and fair.clip_grad_norm == 5.0
    assert cfg.train == dataclasses.replace(fair, clip_grad_norm=1.0)


def test_overrides_are_typed_and_win_over_files():
    cfg = config.load(CONFIGS / "demo.yaml", ["train.epochs=9", "train.lr=0.2", "train.sync_bn=false",
                                              "model.weights=/w/r18.pth", "data.max_rotation=5"])
    assert cfg.train.epochs == 9 and cfg.train.lr == 0.2 and cfg.train.sync_bn is False
    assert cfg.model.weights == "/w/r18.pth" and cfg.data.max_rotation == 5.0
    assert cfg.data.image_size == 128  # from demo.yaml, over base.yaml's 512


@pytest.mark.parametrize("override,message", [
    ("train.epochz=3", "unknown key 'train.epochz'"),
    ("trian.epochs=3", "unknown section 'trian'"),
    ("train.epochs=three", "train.epochs must be int, got 'three'"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.sync_bn=maybe", "train.sync_bn must be bool"),
    ("model.depth=26", "model.depth=26 is not one of 18, 34, 50, 101, 152"),
    ("train.amp=fp8", "train.amp='fp8' is not one of auto, off, bf16, fp16"),
    ("epochs=3", "not of the form section.key=value"),
    ("train.warmup_epochs=7", "train.warmup_epochs (7.0) must not exceed train.epochs (6)"),
    ("regression.fit_thresholds=true", "regression.fit_thresholds='true' is not one of train, val, batches, none"),
    ("regression.loss=l1", "regression.loss='l1' is not one of mse, smooth_l1"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1), got 1.0"),
    ("train.lr=fast", "train.lr must be float or auto, got 'fast'"),
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.sampler=weighted", "train.sampler='weighted' is not one of progressive, random, balanced"),
    ("train.natural_from=1.5", "train.natural_from must be in [0, 1] (a share of the run), got 1.5"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(CONFIGS / "demo.yaml", [override])


def test_thresholds_fitted_on_held_out_images_need_a_held_out_set():
    with pytest.raises(ConfigError, match=re.escape("regression.fit_thresholds=val needs a held-out set: set data.val_fraction")):
        config.load(CONFIGS / "demo.yaml", ["model.head=regression", "regression.fit_thresholds=val", "data.val_fraction=0"])
    assert config.load(CONFIGS / "demo.yaml", ["regression.fit_thresholds=val"]).model.head == "classification"  # unused


def test_regression_settings_under_their_old_names_still_load(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  head: regression\ntrain:\n  regression_loss: smooth_l1\n  fit_thresholds: batches\n")
    with caplog.at_level("WARNING", logger="dr_resnet.config"):
        from_file = config.load(old)
        from_cli = config.load(None, ["train.regression_loss=smooth_l1", "train.fit_thresholds=batches"])
    for cfg in (from_file, from_cli):
        assert (cfg.regression.loss, cfg.regression.fit_thresholds) == ("smooth_l1", "batches")
    assert f"{old}: train.regression_loss is now regression.loss" in caplog.text
    assert "command line: train.fit_thresholds is now regression.fit_thresholds" in caplog.text
    saved = config.Config().to_dict()
    del saved["regression"]
    saved["train"].update(regression_loss="smooth_l1", fit_thresholds="val")  # a checkpoint's config before the move
    saved["data"]["val_fraction"] = 0.2
    caplog.clear()
    with caplog.at_level("WARNING", logger="dr_resnet.config"):
        assert config.from_dict(saved).regression == config.RegressionConfig("smooth_l1", "val")
    assert caplog.text == ""  # a run's own saved config is not the user's to fix


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=f"{bad}: train.lr must be float or auto"):
        config.load(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        config.load(loop)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_checkpoints_of_version_0_1_still_load():
    saved = config.Config().to_dict()
    del saved["regression"]
    for legacy, now in ((True, "batches"), (False, "none")):
        saved["train"]["fit_thresholds"] = legacy
        assert config.from_dict(saved).regression.fit_thresholds == now


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(CONFIGS / "resnet50_pretrained.yaml", ["train.epochs=7"])
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg
    assert config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


def test_every_float_field_takes_scientific_notation_from_both_places(tmp_path):
    import typing

    floats = [f"{section}.{f.name}" for section, part in config._sections(Config()).items()
              for f in dataclasses.fields(part) if typing.get_type_hints(type(part))[f.name] in (float, float | None)]
    assert {"train.lr", "train.weight_decay", "train.momentum", "train.clip_grad_norm", "data.val_fraction"} <= set(floats)
    cli = config.load(None, [f"{key}=2e-1" if key != "train.warmup_epochs" else f"{key}=1e0" for key in floats])
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 3e-2\n  weight_decay: 5e-4\ndata:\n  max_rotation: 2e1\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "3e-2"  # YAML 1.1: a string, not a float
    from_file = config.load(path)
    for key in floats:
        section, name = key.split(".")
        expected = 0.2  # train.warmup_epochs=1e0 stretched by train.length=0.2 too
        if key == "train.length":  # applied when read (epochs x 0.2); the multiple is kept
            assert (cli.train.length, cli.train.epochs) == (0.2, 6)
            continue
        assert getattr(getattr(cli, section), name) == expected, key
    assert (from_file.train.lr, from_file.train.weight_decay, from_file.data.max_rotation) == (0.03, 5e-4, 20.0)
    with pytest.raises(ConfigError, match="train.lr must be float or auto, got 'fast'"):
        config.load(None, ["train.lr=fast"])


def test_every_scheduler_does_what_its_name_says():
    assert set(config.CHOICES["train.scheduler"]) == {"none", "cosine", "onecycle"}
    with pytest.raises(ConfigError, match=r"train.scheduler='step' is not one of none, cosine, onecycle"):
        config.load(None, ["train.scheduler=step"])


def test_train_help_lists_every_key_and_print_config_shows_the_resolved_config(capsys):
    """`train --help` is generated from the config dataclasses: every field, its default, allowed values
    and the comment that documents it; --print-config prints what the run would use and trains nothing."""
    import dataclasses

    import yaml

    from dr_resnet.training.train import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for section in dataclasses.fields(config.Config):
        for field in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(config, section.type)):
            assert f"  {section.name}.{field.name} = " in text, field.name
    assert "train.amp = auto  (one of auto, off, bf16, fp16)" in text and "train.lr = auto  (auto or float)" in text
    assert all(k.text for k in config.key_help())  # every key says what it does
    assert main(["--config", str(CONFIGS / "demo.yaml"), "train.epochs=3", "model.weights=scratch", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = config.load(CONFIGS / "demo.yaml", ["train.epochs=3", "model.weights=scratch"]).to_dict()
    assert printed == expected and printed["train"]["epochs"] == 3 and printed["model"]["weights"] == "none"


def test_every_config_key_declares_its_help_in_its_field(monkeypatch):
    """Each key's help is in its declaration's metadata (config.setting): `--help` and docs/reference/config.md
    read it there, so a key declared without help fails here, and the help needs no source file."""
    sections = [(s.name, s.default_factory) for s in dataclasses.fields(Config)]
    declared = {f"{name}.{f.name}": f.metadata.get(config.HELP, "") for name, kind in sections
                for f in dataclasses.fields(kind)}
    missing = [key for key, text in declared.items() if not text.strip()]
    assert not missing, f"config keys without help (declare them with config.setting(default, help)): {missing}"
    import inspect

    def no_source(*args, **kwargs):
        raise OSError("no source")

    monkeypatch.setattr(inspect, "getsource", no_source)  # an installed wheel without .py files, a frozen app
    config.key_help.cache_clear()
    try:
        found = {k.key: k for k in config.key_help()}
    finally:
        config.key_help.cache_clear()
    assert {key: k.text for key, k in found.items()} == declared and len(found) == len(declared)
    assert found["train.sampler"].text.startswith("progressive (grades near-uniform at first")
    assert (found["train.sync_bn"].kind, found["train.lr"].kind, found["model.depth"].kind) == ("auto or bool", "auto or float",
                                                                                                "int")
    assert found["model.depth"].choices == (18, 34, 50, 101, 152) and found["train.amp"].default == "auto"


def test_a_run_without_output_dir_gets_its_own_folder_shared_by_its_processes(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    single = config.load(CONFIGS / "demo.yaml", ["output.dir="]).output.dir
    assert single.startswith("runs/demo-20") and len(single) == len("runs/demo-20261201-101500")  # its start time
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4f1c2a9e-7b7d-4f3e-9d1e-0123456789ab")  # torchrun --standalone
    assert config.load(None).output.dir == "runs/default-4f1c2a9e-7b7d-4f3e-9d1e-"  # every rank the same
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: the rendezvous port
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert config.load(None).output.dir == "runs/default-port29500"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert config.load(None).output.dir == "runs/default-job812.0"  # plain srun: the job step
    assert config.load(None, ["output.dir=runs/mine"]).output.dir == "runs/mine"  # given: kept


@pytest.mark.parametrize("sweep_file", ["sweep.yaml", "demo_sweep.yaml"])
def test_the_arms_of_the_shipped_sweeps_differ_only_in_depth_and_weights(sweep_file):
    """The four-run comparison is fair only if nothing but the two factors tells its arms apart (each arm's
    learning rate then follows its initialisation by the one rule, not a key of its own)."""
    from launch.sweep import Sweep, arm_argv

    from helpers import REPO

    sweep = Sweep.load(REPO / "configs" / sweep_file)
    flat = {}
    for arm in sweep.arms:
        argv = arm_argv(sweep, arm, Path("runs") / arm, [])
        cfg = config.load(argv[1], argv[2:])
        flat[arm] = {k: str(v) for k, v in config.settings_of(cfg.to_dict()).items() if not k.startswith(("output.", "wandb."))}
    differing = {k for arm in flat for k in flat[arm] if len({str(flat[a].get(k)) for a in flat}) > 1}
    assert differing == {"model.depth", "model.weights"}
    assert {(flat[a]["model.depth"], flat[a]["model.weights"]) for a in flat} == {
        ("18", "imagenet"), ("18", "none"), ("50", "imagenet"), ("50", "none")}
