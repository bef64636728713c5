"""Export: ONNX Runtime's and TorchScript's outputs equal PyTorch's on real images, for every head; the
recipe and head travel inside the file; the model card tells the model's story; predict takes exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_predict import read_rows

from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.preprocess import Settings
from dr_resnet.data.recipe import Recipe
from dr_resnet.serving.export import CARD_JSON, CARD_MD, export
from dr_resnet.serving.export import main as export_main
from dr_resnet.serving.grading import load_grader
from dr_resnet.serving.predict import main as predict_main
from dr_resnet.training import checkpoint

EXPORT_TOLERANCE = 1e-5  # largest difference of a probability or score from PyTorch's (fp32, CPU; measured below 1e-6)


def real_images(photos) -> torch.Tensor:
    """The 24 test photos of the `photos` dataset, as the model gets them."""
    recipe = Recipe(48, Settings(size=48))
    return torch.stack([recipe.prepare(p) for p in RetinopathyDataset(photos / "data", "test").paths])


@pytest.mark.parametrize("head,fmt", [("classification", "onnx"), ("classification", "torchscript"),
                                      ("regression", "onnx"), ("regression", "torchscript"), ("ordinal", "onnx"),
                                      ("ordinal", "torchscript")])
def test_exported_model_equals_pytorch_on_real_images(runs, photos, tmp_path, head, fmt):
    ckpt = runs[head] / "checkpoint_best.pt"
    path, card, difference = export(ckpt, fmt, tmp_path / "out")
    assert path.name == ("model.onnx" if fmt == "onnx" else "model.ts") and difference <= EXPORT_TOLERANCE
    original, exported = load_grader(ckpt, torch.device("cpu")), load_grader(path, torch.device("cpu"))
    assert exported.recipe == original.recipe and exported.head_state == original.head_state
    images = real_images(photos)  # 24 real photos: not the batch size of the export's example (dynamic batch)
    for tta in ("none", "flips"):
        want, got = original.grade(images, tta), exported.grade(images, tta)
        assert np.array_equal(want.grades, got.grades)
        assert np.abs(want.values - got.values).max() <= EXPORT_TOLERANCE
        assert np.abs(want.referable - got.referable).max() <= EXPORT_TOLERANCE
    one = exported.grade(images[:1])
    assert one.grades.shape == (1,) and one.grades[0] == original.grade(images[:1]).grades[0]
    # Made on the CPU, it must run on a GPU too: no device is baked into the graph (predict --device cuda).
    if fmt == "torchscript":
        graph = str(torch.jit.load(path, map_location="cpu").inlined_graph)
        assert "Device" not in graph and 'value="cpu"' not in graph
    else:
        import onnx

        assert not [n for n in onnx.load(path).graph.node for a in n.attribute if a.s in (b"cpu", b"cuda")]


def test_model_card_and_predict_on_an_export(runs, photos, tmp_path, capsys):
    ckpt = runs["regression"] / "checkpoint_best.pt"
    assert export_main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "exp")]) == 0
    assert "matches PyTorch" in capsys.readouterr().out
    state = checkpoint.TrainingState.load(ckpt)
    card = json.loads((tmp_path / "exp" / CARD_JSON).read_text())
    assert card["head"] == {"kind": "regression", "outputs": 1, "thresholds": state.head["thresholds"]}
    assert card["recipe"]["preprocess"] == {"size": 48, "threshold": 10, "quality": 95, "normalize": "none"}
    assert card["training"]["data"]["splits"]["train"]["class_counts"] == \
        RetinopathyDataset(photos / "data", "train").class_counts.tolist()
    assert card["metrics"]["epoch"] == state.epoch and card["metrics"]["test"]["qwk"] == state.metrics["test_qwk"]
    assert card["architecture"]["parameters"] == sum(v.numel() for k, v in state.model.items()
                                                     if "running" not in k and "num_batches" not in k)
    assert card["versions"]["trained_with"]["torch"] == str(torch.__version__)
    md = (tmp_path / "exp" / CARD_MD).read_text()
    assert "ResNet-18" in md and f"QWK {state.metrics['test_qwk']:.3f}" in md and "thresholds" in md
    # predict takes the export (its file or its folder) and grades as the checkpoint does.
    photos_list = [str(p) for p in sorted((photos / "raw" / "images").iterdir())[:10]]
    for model, out in ((ckpt, "a.csv"), (tmp_path / "exp", "b.csv"), (tmp_path / "exp" / "model.onnx", "c.csv")):
        assert predict_main(["--checkpoint", str(model), "--images", *photos_list, "--out", str(tmp_path / out),
                             "--workers", "0"]) == 0
    a, b, c = (read_rows(tmp_path / n) for n in ("a.csv", "b.csv", "c.csv"))
    assert [r["grade"] for r in a] == [r["grade"] for r in b] == [r["grade"] for r in c]
    assert np.allclose([float(r["score"]) for r in a], [float(r["score"]) for r in b], atol=EXPORT_TOLERANCE)
    assert {r["thresholds"] for r in b} == {r["thresholds"] for r in a}


def test_export_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert export_main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "x.pt"), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "x.pt") in capsys.readouterr().err
    (tmp_path / "fake.onnx").write_bytes(b"nope")
    assert predict_main(["--checkpoint", str(tmp_path / "fake.onnx"), "--images", str(tmp_path / "x.pt")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
