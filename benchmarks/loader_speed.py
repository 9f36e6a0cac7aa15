#!/usr/bin/env python
"""Data-loading speed of one DataLoader worker: training-pipeline images/s in a single process.

    .venv/bin/python benchmarks/loader_speed.py [--images 16] [--passes 3] [--json out.json]

Writes synthetic ADE20K-like (683x512 JPEG, labels 0..150) and Cityscapes-like (2048x1024 PNG, trainIds) data to a
temporary folder in the real layouts, builds the datasets with the real presets (ADE20K: base 2048x512, crop
512x512; Cityscapes: base 2048x1024, crop 512x1024) and times `dataset[i]` (decode + label mapping + the training
pipeline), one thread, as inside a worker. Also times decoding alone and the evaluation pipeline. A training run
needs about batch_size x it/s images/s in all: workers = that / the figure here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from danet.data import build_dataset
from danet.data.synthetic import render_scene
from danet.presets import get_preset


def scene(rng: np.random.Generator, w: int, h: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like image (smooth shapes, texture, noise) and a label map of `num_classes` values, w x h."""
    img, lab = render_scene(rng, 256)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    lut = rng.integers(0, num_classes, 5).astype(np.uint8)
    return img, cv2.resize(lut[lab], (w, h), interpolation=cv2.INTER_NEAREST)


def make_ade(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "ADEChallengeData2016/images" / split).mkdir(parents=True)
        (root / "ADEChallengeData2016/annotations" / split).mkdir(parents=True)
        for i in range(n):
            img, lab = scene(rng, 683, 512, 151)
            cv2.imwrite(str(root / f"ADEChallengeData2016/images/{split}/ADE_{i:05d}.jpg"), img[..., ::-1])
            Image.fromarray(lab).save(root / f"ADEChallengeData2016/annotations/{split}/ADE_{i:05d}.png")


def make_cityscapes(root: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (root / "leftImg8bit" / split / "city").mkdir(parents=True)
        (root / "gtFine" / split / "city").mkdir(parents=True)
        for i in range(n):
            img, lab = scene(rng, 2048, 1024, 19)
            lab[:40] = 255
            cv2.imwrite(str(root / f"leftImg8bit/{split}/city/city_{i:06d}_000019_leftImg8bit.png"), img[..., ::-1])
            Image.fromarray(lab).save(root / f"gtFine/{split}/city/city_{i:06d}_000019_gtFine_labelTrainIds.png")


def rate(fn, n: int, passes: int) -> float:
    """Images per second: the median over `passes` passes of n calls."""
    times = []
    for p in range(passes):
        t = time.perf_counter()
        for i in range(n):
            fn(p, i)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def measure(preset_name: str, root: Path, n: int, passes: int) -> dict:
    preset = get_preset(preset_name)
    train = build_dataset(preset, root, "train")
    val = build_dataset(preset, root, "val")

    def train_item(p, i):
        train.set_epoch(p)
        train[i]

    return {
        "preset": preset_name,
        "image": f"{train.read(0)[0].shape[1]}x{train.read(0)[0].shape[0]} {train.files[0][0].suffix[1:]}",
        "crop": f"{preset.crop_size[1]}x{preset.crop_size[0]}",
        "read": rate(lambda p, i: train.read(i), n, passes),
        "train": rate(train_item, n, passes),
        "eval": rate(lambda p, i: val[i], n, passes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per dataset (default 16)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes, median reported (default 3)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_ade(tmp / "ade", args.images)
        make_cityscapes(tmp / "cityscapes", args.images)
        rows.append(measure("danet_r50-d8_ade20k", tmp / "ade", args.images, args.passes))
        rows.append(measure("danet_r50-d8_cityscapes", tmp / "cityscapes", args.images, args.passes))
    print("images/s in one process (= one DataLoader worker), 1 thread; cv2", cv2.__version__)
    print(f"{'preset':<26} {'image':<15} {'crop':<9} {'read':>7} {'train':>7} {'eval':>7}")
    for r in rows:
        print(f"{r['preset']:<26} {r['image']:<15} {r['crop']:<9} {r['read']:7.1f} {r['train']:7.1f} {r['eval']:7.1f}")
    print("read: decode image + label and map labels; train: read + training pipeline; eval: read + test pipeline")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
