"""Draw docs/images/predictions.jpg, the README's picture of `danet predict`: the first N val images of the synthetic
dataset, their ground truth and the checkpoint's predictions, as overlays, with the classes' legend.

    .venv/bin/python tools/make_readme_predictions.py --checkpoint runs/synthetic/best.pth

The predictions are `danet predict --overlay`'s own files (run here into a temporary folder).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from danet import viz
from danet.cli import main as danet_main
from danet.data import ensure_synthetic
from danet.data.io import read_image, read_label
from danet.presets import get_preset


def montage(images: list[Path], labels: list[Path], overlays: list[Path], scale: int = 2) -> Image.Image:
    """Rows: image, ground truth overlay, prediction overlay; one column per image; the legend below."""
    preset = get_preset("danet_tiny_synthetic")
    pad, title = 6, 22
    size = [s * scale for s in Image.open(images[0]).size]
    legend = viz.legend_image(preset.classes, preset.palette)
    rows = {
        "image": [Image.fromarray(read_image(p)) for p in images],
        "ground truth": [
            Image.fromarray(viz.overlay(read_image(p), read_label(q), preset.palette, 0.5))
            for p, q in zip(images, labels, strict=True)
        ],
        "prediction (danet predict --overlay)": [Image.open(p).convert("RGB") for p in overlays],
    }
    width = max(pad + len(images) * (size[0] + pad), legend.width + 2 * pad)
    height = len(rows) * (title + size[1] + pad) + legend.height + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, tiles in rows.items():
        draw.text((pad, y + 3), name, fill="black", font=viz.font(14))
        for i, tile in enumerate(tiles):
            canvas.paste(tile.resize(size, Image.NEAREST), (pad + i * (size[0] + pad), y + title))
        y += title + size[1] + pad
    canvas.paste(legend, (pad, y))
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/synthetic/best.pth")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default="docs/images/predictions.jpg")
    args = ap.parse_args()
    root = ensure_synthetic()
    images = sorted((root / "images" / "validation").glob("*.jpg"))[: args.images]
    labels = [root / "masks" / "validation" / f"{p.stem}.png" for p in images]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["predict", "--checkpoint", args.checkpoint, *map(str, images), "--out", tmp, "--overlay"]
        if danet_main([*argv, "--no-progress"]) != 0:
            raise SystemExit("danet predict failed")
        overlays = [Path(tmp) / f"{p.stem}_overlay.jpg" for p in images]
        montage(images, labels, overlays).save(args.out, quality=88, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
