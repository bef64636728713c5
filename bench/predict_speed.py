"""predict's speed on raw photos against the same model's pure inference, side by side in one run.

Pure inference: the model grading photos already prepared and in memory (no decoding at all), at the
recipe's size and the same batch size. predict: `dr_resnet.predict.predict` over raw 3000 x 2000 JPEGs,
preparing each in its data workers with preprocess's reduced-scale JPEG decode. Also timed: preparing
the photos alone, with the reduced-scale decode and with a full decode (what it saves). Prints images/s
and the ratios; the target is predict >= 0.8 x pure inference.

    python bench/predict_speed.py [--images 48] [--size 512] [--batch-size 16] [--workers 1] [--depth 18]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dr_resnet.config import Config
from dr_resnet.data.preprocess import Settings, crop_square
from dr_resnet.data.recipe import Recipe
from dr_resnet.data.synthetic import render_fundus
from dr_resnet.model.resnet import build_resnet
from dr_resnet.serving.grading import load_grader
from dr_resnet.serving.predict import predict
from dr_resnet.training.checkpoint import TrainingState

DISTINCT = 6  # photos rendered; the rest are copies (a copy costs the same to decode)


def raw_photos(folder: Path, count: int) -> list[Path]:
    """`count` EyePACS-sized raw JPEGs: synthetic photos rendered 2000 px high, put on 3000 x 2000 canvases."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(DISTINCT):
        photo = render_fundus(i % 5, seed=4, split="test", index=i, size=2000)
        canvas = Image.new("RGB", (3000, 2000))
        photo.thumbnail((3000, 2000))
        canvas.paste(photo, ((3000 - photo.width) // 2, (2000 - photo.height) // 2))
        made.append(folder / f"photo_{i}.jpeg")
        canvas.save(made[-1], quality=90)
    paths = []
    for i in range(count):
        path = folder / f"copy_{i:03d}.jpeg"
        shutil.copyfile(made[i % DISTINCT], path)
        paths.append(path)
    return paths


def model_file(path: Path, depth: int, size: int) -> Path:
    """A checkpoint of an untrained ResNet with the recipe of photos prepared at `size` (speed only)."""
    cfg = Config()
    cfg.model.depth, cfg.data.image_size = depth, size
    network = build_resnet(depth, 5)
    TrainingState(model=network.state_dict(), optimizer={}, scheduler={}, scaler={}, epoch=0, best={},
                  config=cfg.to_dict(), recipe=Recipe(size, Settings(size=size)).to_dict()).save(path)
    return path


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        paths = raw_photos(work / "raw", args.images)
        grader = load_grader(model_file(work / "model.pt", args.depth, args.size), torch.device("cpu"))
        prepared = torch.stack([grader.recipe.prepare(p) for p in paths])
        batches = prepared.split(args.batch_size)
        grader.grade(batches[0])  # warm-up

        def inference() -> None:
            for batch in batches:
                grader.grade(batch)

        def predicting() -> None:
            predict(grader, paths, work / "predictions.csv", batch_size=args.batch_size, workers=args.workers,
                    progress=False)

        settings = grader.recipe.preprocess

        def full_decode() -> None:
            for path in paths[:DISTINCT * 2]:
                with Image.open(path) as image:
                    image.convert("RGB").resize((settings.size, settings.size))

        t_inference, t_predict = best_of(args.repeats, inference), best_of(args.repeats, predicting)
        t_prepare = best_of(args.repeats, lambda: [crop_square(p, settings) for p in paths[:DISTINCT * 2]])
        t_full = best_of(args.repeats, full_decode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n, k = args.images, DISTINCT * 2
    inference_ips, predict_ips = n / t_inference, n / t_predict
    print(f"ResNet{args.depth} at {args.size} px, batch {args.batch_size}, {args.images} raw 3000x2000 JPEGs, "
          f"{args.workers} data worker(s), torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"pure inference (photos prepared in memory): {inference_ips:7.2f} images/s")
    print(f"predict on raw photos:                       {predict_ips:7.2f} images/s")
    print(f"ratio predict / pure inference:              {predict_ips / inference_ips:7.2f}  (target >= 0.8)")
    print(f"preparing one photo, one core: reduced-scale decode {1000 * t_prepare / k:.0f} ms; full decode alone "
          f"{1000 * t_full / k:.0f} ms ({t_full / t_prepare:.1f}x)")


if __name__ == "__main__":
    main()
