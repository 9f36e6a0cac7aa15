#!/usr/bin/env python
"""Training on a dataset's own classes, from scratch and fine-tuned from a checkpoint of other classes.

    .venv/bin/python benchmarks/finetune_own_classes.py --init runs/synthetic/last.pth [--epochs 20] [--json out.json]

Builds a 3-class folder dataset from the bundled synthetic scenes (their 5 classes merged: background; round = the
discs; angular = squares, triangles and stripes) in the layout of `data.dataset=folder` (classes.yaml, images/ and
masks/ {train,val}), then trains `danet_tiny_synthetic`'s recipe on it twice for the same iterations: from random
weights, and from `--init` (the main job's 5-class checkpoint: every weight but the four classifiers). Prints the
val mIoU of both and the wall time; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from danet.cli import main as danet
from danet.data import ensure_synthetic
from danet.engine.logging import read_log

MERGE = np.array([0, 1, 2, 2, 2], np.uint8)  # background, disc -> round, square / triangle / stripes -> angular
CLASSES = "classes:\n  - {name: background, color: [0, 0, 0]}\n  - {name: round, color: [230, 60, 60]}\n" + (
    "  - {name: angular, color: [60, 90, 230]}\n"
)


def merged_dataset(out: Path) -> Path:
    src = ensure_synthetic()
    (out / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "classes.yaml").write_text(CLASSES)
    for theirs, ours in (("training", "train"), ("validation", "val")):
        (out / "images" / ours).mkdir(parents=True, exist_ok=True)
        (out / "masks" / ours).mkdir(parents=True, exist_ok=True)
        for image in sorted((src / "images" / theirs).iterdir()):
            (out / "images" / ours / image.name).write_bytes(image.read_bytes())
            mask = np.asarray(Image.open(src / "masks" / theirs / f"{image.stem}.png"))
            merged = np.where(mask == 255, 255, MERGE[np.minimum(mask, 4)]).astype(np.uint8)
            Image.fromarray(merged).save(out / "masks" / ours / f"{image.stem}.png")
    return out


def train(data: Path, work: Path, epochs: int, init: str | None) -> dict:
    sets = [f"schedule.epochs={epochs}", "schedule.eval_interval=5", "progress=false"]
    sets += [f"init_checkpoint={init}"] if init else []
    argv = ["train", "danet_tiny_synthetic", "--data-root", str(data), "--work-dir", str(work)]
    argv += ["--set", "data.dataset=folder", *sum((["--set", s] for s in sets), [])]
    t0 = time.time()
    assert danet(argv) == 0
    vals = [r for r in read_log(work / "log.jsonl") if r["type"] == "val"]
    return {"seconds": round(time.time() - t0, 1), "val": [(r["iter"], round(r["mIoU"], 2)) for r in vals]}


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="a 5-class danet_tiny_synthetic checkpoint (the main job)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="danet-own-") as tmp:
        data = merged_dataset(Path(tmp) / "data")
        result = {
            "epochs": args.epochs,
            "scratch": train(data, Path(tmp) / "scratch", args.epochs, None),
            "finetuned": train(data, Path(tmp) / "finetuned", args.epochs, args.init),
        }
    for name in ("scratch", "finetuned"):
        r = result[name]
        print(f"{name:>9}: val mIoU {' '.join(f'{m:.1f}@{i}' for i, m in r['val'])}  ({r['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run()
