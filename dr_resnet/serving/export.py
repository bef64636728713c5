"""Export a trained model to ONNX or TorchScript, with its recipe inside and a model card beside it.

    python -m dr_resnet.export --checkpoint RUN/checkpoint_best.pt --format onnx|torchscript --out DIR

DIR gets model.onnx (or model.ts), model_card.json and model_card.md. The exported model is
grading.GradingModel: uint8 RGB images (N, 3, S, S), any N, in; grade, values (the grade probabilities,
or the regression score) and referable_score out: normalisation and the head's decoding (a regression
head's thresholds included) are inside. The recipe, head and model card travel in the file's metadata
(ONNX metadata_props, TorchScript extra files), so `predict --checkpoint DIR/model.onnx` prepares photos
as the model was trained. The export is checked against PyTorch before the command returns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from dr_resnet import GRADES, __version__
from dr_resnet.errors import UserError, run_command
from dr_resnet.model.resnet import architecture, count_parameters
from dr_resnet.registry import HEAD_SPECS
from dr_resnet.results.metrics import METRICS
from dr_resnet.results.rundir import read_metrics
from dr_resnet.serving.grading import METADATA_KEY, ONNX_SUFFIX, OUTPUT_NAMES, TORCHSCRIPT_SUFFIX, CheckpointGrader, load_grader
from dr_resnet.training.checkpoint import TrainingState

FORMATS = {"onnx": ONNX_SUFFIX, "torchscript": TORCHSCRIPT_SUFFIX}
CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
CHECK_TOLERANCE = 1e-4  # largest difference allowed between the export's values and PyTorch's (fp32, CPU)
INTENDED_USE = ("Research on diabetic-retinopathy grading. Not a medical device: it has not been validated for "
                "clinical use, and its figures hold for its test data only.")


class ExportError(UserError, RuntimeError):
    """The export could not be written or does not reproduce PyTorch's outputs; the message says which."""


def selected_metrics(state: TrainingState, checkpoint: Path) -> dict:
    """The checkpoint's epoch's metrics: recorded in it, or (older checkpoints) its run directory's log."""
    row = state.metrics or next((r for r in read_metrics(checkpoint.parent) if r["epoch"] == state.epoch), {})
    if not row:
        return {}
    keep = ("loss", *(m.column for m in METRICS.values()), "recall")  # test_<keep>, val_<keep> in the row
    out = {"epoch": row["epoch"]}
    for split, name in (("test", "test"), ("val", "held_out")):
        if METRICS["qwk"].key(split) in row:
            out[name] = {k: row[f"{split}_{k}"] for k in keep if f"{split}_{k}" in row}
    return out


def model_card(grader: CheckpointGrader, checkpoint: Path, fmt: str, model_file: Path) -> dict:
    state, cfg = grader.state, grader.config
    arch = architecture(cfg.model.depth)
    trained = state.provenance or {}
    data = trained.get("data") or {"root": cfg.data.root, "splits": {}, "note": "not recorded (checkpoint before 0.2)"}
    head = {"kind": grader.head_kind, "outputs": grader.model.head.outputs, **grader.head_state}
    return {
        "name": cfg.model.arm,
        "architecture": {"name": f"ResNet-{cfg.model.depth}", "block": arch.block, "layers": list(arch.layers),
                         "parameters": count_parameters(grader.network), "initial_weights": cfg.model.weights},
        "head": head,
        "grades": list(GRADES),
        "recipe": grader.recipe.to_dict() | ({"assumed": True} if grader.recipe.assumed else {}),
        "inputs": {"images": "uint8 RGB (N, 3, S, S) with S = recipe.image_size, prepared as recipe.preprocess says"},
        "outputs": {"grade": "int64 (N,): the predicted grade 0..4",
                    "values": ("float (N,): the score on the grade scale, cut at the thresholds"
                               if HEAD_SPECS[grader.head_kind].has_thresholds
                               else "float (N, 5): the probability of each grade"),
                    "referable_score": "float (N,): the referable-DR score (grade >= 2); higher is more likely"},
        "training": {"data": data, "epochs": cfg.train.epochs, "selected_epoch": state.epoch, "selection": state.best,
                     "recipe": {k: getattr(cfg.train, k) for k in ("lr", "batch_size", "scheduler", "class_weights",
                                                                     "sampler", "amp")}},
        "metrics": selected_metrics(state, checkpoint),
        "versions": {"trained_with": {k: trained[k] for k in ("dr_resnet", "torch", "torchvision") if k in trained},
                     "exported_with": {"dr_resnet": __version__, "torch": str(torch.__version__)}},
        "export": {"format": fmt, "file": model_file.name, "checkpoint": str(checkpoint),
                   "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest() if model_file.exists() else None},
        "intended_use": INTENDED_USE,
    }


def card_markdown(card: dict) -> str:
    """The model card for people: the same facts as the JSON."""
    a, h, m, t = card["architecture"], card["head"], card["metrics"], card["training"]
    lines = [f"# Model card: {card['name']}", "", card["intended_use"], "",
             "## Model", "",
             f"- {a['name']} ({a['block']} blocks {a['layers']}), {a['parameters']:,} parameters, "
             f"initial weights: {a['initial_weights']}",
             f"- head: {h['kind']} ({h['outputs']} output(s))"
             + (f", thresholds {', '.join(f'{x:.3f}' for x in h['thresholds'])}" if "thresholds" in h else ""),
             f"- file: {card['export']['file']} ({card['export']['format']}), sha256 {card['export']['sha256']}",
             "", "## What the photos go through (the recipe)", ""]
    r = card["recipe"]
    pre = r["preprocess"]
    lines.append("- preprocessing: " + (f"retina crop (threshold {pre['threshold']}), centred square, {pre['size']} px, "
                                          f"normalisation {pre['normalize']}" if pre else
                                          "none recorded: photos padded to a centred square")
                 + (" (assumed: the checkpoint predates recorded recipes)" if r.get("assumed") else ""))
    lines += [f"- network input: {r['image_size']} px RGB, (x / 255 - mean) / std with mean {r['mean']} and std {r['std']}",
              "", "## Training data", ""]
    data = t["data"]
    lines.append(f"- root: {data.get('root')}" + (f" ({data['format']} layout)" if data.get("format") else "")
                 + (f"; splits {data['note']}" if data.get("note") else ""))
    for split, info in data.get("splits", {}).items():
        counts = info["class_counts"]
        share = ", ".join(f"{c} ({c / max(1, info['images']):.0%})" for c in counts)
        lines.append(f"- {split}: {info['images']} images; grades 0..4: {share}")
    how = ""
    if t["selection"]:
        how = (" (the final epoch: nothing held out)" if t["selection"].get("on") == "final"
               else f" by {t['selection'].get('metric')} on {t['selection'].get('on')}")
    lines += [f"- selected epoch {t['selected_epoch']} of {t['epochs']}{how}", "",
              "## Metrics at the selected epoch", ""]
    if not m:
        lines.append("Not recorded.")
    for name in ("test", "held_out"):
        if name in m:
            s = m[name]
            values = [f"{m.label} {format(s[m.column], m.fmt)}" for m in METRICS.values() if m.column in s]
            recall = " ".join(f"{x:.2f}" for x in s.get("recall", []))
            lines.append(f"- {name.replace('_', '-')}: {', '.join(values)}, recall per grade {recall}")
    v = card["versions"]
    lines += ["", "## Versions", "",
              f"- trained with: {', '.join(f'{k} {x}' for k, x in v['trained_with'].items()) or 'not recorded'}",
              f"- exported with: {', '.join(f'{k} {x}' for k, x in v['exported_with'].items())}", ""]
    return "\n".join(lines)


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dr-resnet[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.save(proto, str(path))


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice: TorchScript is still what C++ and mobile load
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": metadata})


def check_export(original: CheckpointGrader, exported_path: Path, images: torch.Tensor) -> float:
    """The largest difference between the export's values and PyTorch's on `images` (grades must be equal)."""
    exported = load_grader(exported_path, torch.device("cpu"))
    want, got = original.grade(images), exported.grade(images)
    if not np.array_equal(want.grades, got.grades):
        raise ExportError(f"{exported_path}: its grades differ from PyTorch's on a test batch")
    difference = max(float(np.abs(want.values - got.values).max()), float(np.abs(want.referable - got.referable).max()))
    if difference > CHECK_TOLERANCE:
        raise ExportError(f"{exported_path}: its outputs differ from PyTorch's by {difference:.2e} (> {CHECK_TOLERANCE})")
    return difference


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> tuple[Path, dict, float]:
    """Write DIR/model.<onnx|ts> and the model card; returns the model's path, the card and the checked difference."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    grader = CheckpointGrader(checkpoint, torch.device("cpu"), amp="off")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model{FORMATS[fmt]}"
    size = grader.recipe.image_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = {"recipe": grader.recipe.to_dict(), "head": {"kind": grader.head_kind, "state": grader.head_state},
                "card": model_card(grader, checkpoint, fmt, Path("unwritten"))}
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    writer(grader.model, example, path, json.dumps(metadata))
    check = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    difference = check_export(grader, path, check)  # another batch size than the example's: the batch is dynamic
    card = model_card(grader, checkpoint, fmt, path)
    (out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out / CARD_MD).write_text(card_markdown(card))
    return path, card, difference


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dr_resnet.train")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="the exported model's format")
    p.add_argument("--out", required=True, help="folder for the model and its model card")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    def work() -> None:
        path, card, difference = export(args.checkpoint, args.format, args.out)
        print(f"exported {card['name']} ({card['head']['kind']} head, {card['recipe']['image_size']} px) to {path}; "
              f"matches PyTorch to {difference:.1e}; model card: {Path(args.out) / CARD_MD}")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
