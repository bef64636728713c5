"""Evaluate any saved checkpoint on a split of any dataset, the training one or another (external
validation): metrics.json (with bootstrap 95% intervals), the per-image predictions.csv and the
confusion-matrix PNG. Every image is counted exactly once, also under torchrun. Each photo goes through
the model's recipe as predict does: a copy preprocessed with the training recipe is used as it is, a
raw photo is cropped, squared and resized first.

    python -m dr_resnet.evaluate --checkpoint RUN/checkpoint_best.pt --data-root DIR [--split test]
        [--format F data.KEY=VALUE ...] [--out DIR]

Without --out the results go to RUN/evaluations/<dataset>-<split>/ (the dataset: a published layout's
name, messidor2, idrid, ..., else the data root's folder name; where that folder already holds another
root's evaluation, a short hash of this root's path is added, so nothing is overwritten), where the
report finds them and shows them beside the run's own test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

from dr_resnet.data import check
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.formats import add_format_arguments, format_arguments
from dr_resnet.data.recipe import Recipe
from dr_resnet.registry import DATASETS
from dr_resnet.results.metrics import expected_calibration_error
from dr_resnet.results.predictions import write_predictions
from dr_resnet.results.rundir import CONFUSION_PNG, EVALUATIONS_DIR, PREDICTIONS_FILE
from dr_resnet.results.stats import RESAMPLES, bootstrap_intervals
from dr_resnet.training import components, distributed
from dr_resnet.training.loop import TTA_MODES, evaluate
from dr_resnet.training.runtime import DEVICES, PRECISIONS, configure_backends
from dr_resnet.training.tracking import MODES, Tracker, TrackingSettings, identity, identity_tags, new_run_id

log = logging.getLogger("dr_resnet.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dr_resnet.train")
    p.add_argument("--data-root", required=True, help="dataset folder (any data.format: see --format)")
    p.add_argument("--split", default="test", help="the dataset's split to evaluate on")
    p.add_argument("--image-size", type=int, default=0, help="default: the size the checkpoint was trained at")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per process")
    p.add_argument("--amp", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: one GPU per process if CUDA is there")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation: 'flips' averages the predictions over h-, v- and hv-flips")
    p.add_argument("--bad-images", default="stop", choices=("stop", "skip"),
                   help="photos that cannot be decoded or are blank, found before evaluating: stop (naming every one) "
                        "or skip (evaluate without them, named in metrics.json)")
    p.add_argument("--resamples", type=int, default=RESAMPLES,
                   help="bootstrap resamples for the 95%% intervals in metrics.json (0: none)")
    p.add_argument("--out", default="", help="folder for metrics.json, predictions.csv and confusion_matrix.png "
                                           "(default: RUN/evaluations/<data root's name>-<split>)")
    p.add_argument("--wandb", default="disabled", choices=MODES,
                   help="log the evaluation as a W&B run (job_type eval) in the training run's group, with the "
                        "training run's project and entity (WANDB_MODE wins)")
    add_format_arguments(p)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    if not args.out:
        args.out = str(default_out(args.checkpoint, args.data_root, args.split, args.format))
    return args


def dataset_label(data_root: str | Path, fmt: str) -> str:
    """What an evaluation calls its dataset: a published layout's name, else the data root's folder name."""
    return fmt if fmt in DATASETS else Path(data_root).resolve().name


def default_out(checkpoint: str | Path, data_root: str | Path, split: str, fmt: str = "auto") -> Path:
    """Where an evaluation goes without --out: beside the checkpoint, named by the dataset and split; a
    short hash of the root's path is added where that folder holds another root's evaluation."""
    root = Path(data_root).resolve()
    folder = Path(checkpoint).resolve().parent / EVALUATIONS_DIR / f"{dataset_label(root, fmt)}-{split}"
    earlier = folder / "metrics.json"
    if earlier.is_file() and Path(json.loads(earlier.read_text()).get("data_root", "")).resolve() != root:
        folder = folder.with_name(f"{folder.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}")
    return folder


def run(args: argparse.Namespace, info: distributed.DistInfo) -> dict:
    # --amp off means full fp32 on the GPU too (no TF32 convolutions): what a CPU computes, to rounding.
    configure_backends(info.device, cudnn_benchmark=True, deterministic=False, tf32=args.amp != "off")
    trained = components.trained_model(args.checkpoint, info.device, args.amp)
    state, cfg, head, model, execution = trained.state, trained.cfg, trained.head, trained.network, trained.execution
    recipe = Recipe.of_trained(state.recipe, cfg.data.root, cfg.data.image_size, str(args.checkpoint))
    if args.image_size:
        recipe = dataclasses.replace(recipe, image_size=args.image_size)
    size = recipe.image_size
    fmt, options = format_arguments(args)
    dataset = components.read_everywhere(lambda: {args.split: RetinopathyDataset(
        args.data_root, args.split, format=fmt, image_size=size, options=options, prepare=recipe.prepare)})[args.split]
    checked, skipped = check.screen({args.split: dataset}, args.bad_images, max(1, args.workers), size,
                                    "Replace or remove them, or pass --bad-images skip to evaluate without them",
                                    log, ranks=components.check_ranks())
    dataset = checked[args.split]
    components.same_everywhere(checked)
    loader = components.evaluation_loader(dataset, args.batch_size, args.workers, info)
    evaluation = evaluate(model, loader, head, execution, tta=args.tta)
    precision = execution.precision
    grades, values = evaluation.per_image(head)
    intervals = bootstrap_intervals(evaluation.targets, grades, evaluation.referable_scores, dataset.patients,
                                    resamples=args.resamples) if args.resamples and info.is_main else None
    calibration = expected_calibration_error(values, evaluation.targets) if head.spec.has_probabilities else None
    result = {"checkpoint": str(args.checkpoint), "epoch": int(state.epoch), "data_root": str(Path(args.data_root).resolve()),
              "dataset": dataset_label(args.data_root, fmt), "format": dataset.format, "split": args.split,
              "image_size": size, "head": cfg.model.head, **head.state(), "tta": args.tta,
              "device": str(info.device), "precision": precision.name,
              "loss": evaluation.loss, **evaluation.scores(), **({"intervals": intervals} if intervals else {}),
              **({"skipped_images": skipped} if skipped else {}),
              **({"ece": calibration["ece"], "calibration_bins": calibration["bins"]} if calibration else {})}
    if info.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        write_predictions(out / PREDICTIONS_FILE, dataset.names, evaluation.targets, grades, values,
                          evaluation.referable_scores, cfg.model.head, dataset.patients, int(state.epoch))
        from dr_resnet.results.plots import save_confusion_matrix

        save_confusion_matrix(evaluation.confusion_matrix, out / CONFUSION_PNG,
                              f"resnet{cfg.model.depth}, epoch {state.epoch}, {args.split} split\n"
                              f"accuracy {result['accuracy']:.1%}, QWK {result['qwk']:.3f}")
        track(args, cfg, result, out)
    return result


def track(args: argparse.Namespace, cfg, result: dict, out: Path) -> None:
    """--wandb: the evaluation as an eval run beside its training run (same project, entity and group;
    the arm, depth, initialisation, seed and split as tags)."""
    w, who = cfg.wandb, identity(cfg.model, cfg.train.seed)
    trained = Path(args.checkpoint).resolve().parent.name
    settings = TrackingSettings(args.wandb, w.project, w.entity, w.group, f"{trained}-eval-{args.split}", job_type="eval",
                                tags=(*identity_tags(who), f"split-{args.split}"), init_timeout=w.init_timeout)
    described = {**cfg.to_dict(), "run": who,
                 "evaluation": {k: result[k] for k in ("checkpoint", "epoch", "data_root", "split", "tta", "precision")}}
    tracker = Tracker(settings, out, new_run_id(), described)
    try:
        tracker.log_evaluation(result, out / CONFUSION_PNG)
    finally:
        tracker.finish()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work(info: distributed.DistInfo) -> None:
        result = run(args, info)
        if info.is_main:
            ci = result.get("intervals")
            qwk_ci = f" (95% CI {ci['qwk']['low']:.3f}-{ci['qwk']['high']:.3f}, resampling {ci['unit']})" if ci else ""
            print(f"{result['num_samples']} images: accuracy {result['accuracy']:.1%} (majority baseline "
                  f"{result['majority_baseline']:.1%}), QWK {result['qwk']:.3f}{qwk_ci}, referable DR (grade >= 2) "
                  f"sensitivity {result['referable_sensitivity']:.2f} specificity {result['referable_specificity']:.2f} "
                  f"AUC {result['referable_auc']:.3f}; wrote {Path(args.out) / 'metrics.json'}")
    return distributed.run_entry(work, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
