"""Pictures with PIL only: palettes, colour label maps, overlays, training curves, per-class IoU bars and the
confusion matrix.

Label maps are saved as palette ("P" mode) PNGs: the pixel values are the class indices (255 = ignore), so the
files are both viewable and machine-readable.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import discard, replace_target, temp_beside

IGNORE_COLOR = (224, 224, 192)  # the VOC boundary colour, for label 255
SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


# ---- palettes and label maps -----------------------------------------------------------------------------------------
def palette_array(palette: Sequence[Sequence[int]] | None, ignore_index: int = 255) -> np.ndarray:
    """A `(256, 3)` uint8 colour table: the given colours, then distinct generated ones; `ignore_index` light grey."""
    table = np.zeros((256, 3), dtype=np.uint8)
    given = [tuple(c) for c in (palette or [])][:256]
    for i in range(256):  # bit-interleaved colours (the VOC scheme) for the classes without a given colour
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        table[i] = (r, g, b)
    if given:
        table[: len(given)] = np.asarray(given, dtype=np.uint8)
    if 0 <= ignore_index < 256 and ignore_index >= len(given):
        table[ignore_index] = IGNORE_COLOR
    return table


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    """`(H, W)` class indices -> `(H, W, 3)` uint8 RGB."""
    return palette_array(palette)[np.asarray(label).astype(np.int64).clip(0, 255)]


def label_image(label: np.ndarray, palette: Sequence[Sequence[int]] | None) -> Image.Image:
    """`(H, W)` class indices -> a "P" mode PIL image whose pixel values are the indices."""
    label = np.asarray(label)
    if label.max(initial=0) > 255 or label.min(initial=0) < 0:
        raise ValueError("palette PNGs hold class indices 0..255")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(palette_array(palette).reshape(-1).tolist())
    return img


def save_label_png(path: str | Path, label: np.ndarray, palette: Sequence[Sequence[int]] | None) -> None:
    label_image(label, palette).save(path)


def overlay(image: np.ndarray, label: np.ndarray, palette, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Blend the colour label map over an `(H, W, 3)` uint8 RGB image; ignored pixels keep the image."""
    color = colorize(label, palette).astype(np.float32)
    out = np.asarray(image, dtype=np.float32) * (1 - alpha) + color * alpha
    keep = np.asarray(label) == ignore_index
    out[keep] = np.asarray(image, dtype=np.float32)[keep]
    return out.round().clip(0, 255).astype(np.uint8)


# ---- a small plotting kit ------------------------------------------------------------------------------------------
# Pillow's bundled font draws ASCII only ("café" gets a box for the é): a system font that covers Latin, Greek and
# Cyrillic names comes first where the machine has one (PIL finds these by file name in the system's font folders).
SYSTEM_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


@functools.cache
def font(size: int) -> ImageFont.ImageFont:
    for name in SYSTEM_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-6:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def tick_label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.1e}"
    decimals = 0
    while decimals < 8 and abs(round(step, decimals) - step) > 1e-9 * max(abs(step), 1e-12):
        decimals += 1
    return f"{v:.{decimals}f}"


class Axes:
    """A rectangle of a PIL image with data coordinates, ticks, grid, labels and a legend."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim, ylim) -> None:
        self.draw, self.box = draw, box
        self.xt, self.yt = nice_ticks(*xlim), nice_ticks(*ylim)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        self.legend: list[tuple[str, tuple[int, int, int]]] = []

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, t, r, b = self.box
        fx = (x - self.x0) / ((self.x1 - self.x0) or 1)
        fy = (y - self.y0) / ((self.y1 - self.y0) or 1)
        return left + fx * (r - left), b - fy * (b - t)

    def frame(self, title: str, xlabel: str, ylabel: str) -> None:
        d, (left, t, r, b) = self.draw, self.box
        small, mid = font(13), font(15)
        for i, ticks in enumerate((self.xt, self.yt)):
            step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
            for v in ticks:
                if i == 0:
                    x, _ = self.px(v, self.y0)
                    d.line([(x, t), (x, b)], fill=(232, 232, 232))
                    d.line([(x, b), (x, b + 5)], fill=(60, 60, 60))
                    d.text((x, b + 8), tick_label(v, step), fill=(60, 60, 60), font=small, anchor="mt")
                else:
                    _, y = self.px(self.x0, v)
                    d.line([(left, y), (r, y)], fill=(232, 232, 232))
                    d.line([(left - 5, y), (left, y)], fill=(60, 60, 60))
                    d.text((left - 8, y), tick_label(v, step), fill=(60, 60, 60), font=small, anchor="rm")
        d.rectangle(self.box, outline=(60, 60, 60))
        d.text(((left + r) / 2, t - 12), title, fill=(0, 0, 0), font=font(17), anchor="md")
        d.text(((left + r) / 2, b + 30), xlabel, fill=(30, 30, 30), font=mid, anchor="mt")
        label = Image.new("L", (b - t, 22), 0)
        ImageDraw.Draw(label).text(((b - t) / 2, 11), ylabel, fill=255, font=mid, anchor="mm")
        self.ylabel = label.rotate(90, expand=True)

    def paste_ylabel(self, img: Image.Image, x: int) -> None:
        left, t, r, b = self.box
        img.paste((30, 30, 30), (x, t), self.ylabel)

    def line(self, xs, ys, color, name: str | None = None, width: int = 2, markers: bool = False) -> None:
        pts = [self.px(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=width, joint="curve")
        if markers or len(pts) == 1:
            for x, y in pts:
                self.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color, outline=(255, 255, 255))
        if name:
            self.legend.append((name, color))

    def draw_legend(self, corner: str = "top") -> None:
        if not self.legend:
            return
        f = font(13)
        left, t, r, b = self.box
        w = max(int(self.draw.textlength(n, font=f)) for n, _ in self.legend) + 34
        x, y = r - w - 8, t + 8 if corner == "top" else b - 8 - (20 * len(self.legend) + 6)
        self.draw.rectangle([x, y, x + w, y + 20 * len(self.legend) + 6], fill=(255, 255, 255), outline=(180, 180, 180))
        for i, (name, color) in enumerate(self.legend):
            yy = y + 13 + 20 * i
            self.draw.line([(x + 6, yy), (x + 24, yy)], fill=color, width=3)
            self.draw.text((x + 30, yy), name, fill=(30, 30, 30), font=f, anchor="lm")


def _smooth(values: list[float], k: int) -> list[float]:
    """Centred moving average over `k` points (k=1: unchanged)."""
    if k <= 1 or len(values) < 3:
        return values
    arr = np.asarray(values, dtype=np.float64)
    pad = k // 2
    padded = np.pad(arr, pad, mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")[: len(arr)].tolist()


def plot_training_curves(records: list[dict], path: str | Path, title: str = "training") -> Path:
    """Three panels from log.jsonl records: losses, learning rate and validation mIoU against the iteration."""
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val" and r.get("mIoU") is not None]
    w, h = 1650, 520
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((w / 2, 14), title, fill=(0, 0, 0), font=font(20), anchor="mt")
    panels = [(90 + i * 540, 80, 90 + i * 540 + 440, h - 80) for i in range(3)]
    iters = [r["iter"] for r in train] or [0, 1]
    xlim = (0, max(iters + [r["iter"] for r in val]))

    parts = [("loss", "total"), ("loss_out", "main"), ("loss_pam", "pam"), ("loss_cam", "cam"), ("loss_aux", "aux")]
    parts = [(k, n) for k, n in parts if any(k in r for r in train)]
    k = max(1, len(train) // 50)
    series = {key: _smooth([r.get(key, math.nan) for r in train], k) for key, _ in parts}
    ys = [v for s in series.values() for v in s if math.isfinite(v)] or [0.0, 1.0]
    ax = Axes(d, panels[0], xlim, (0, max(ys) * 1.05))
    ax.frame("loss" + (f" (moving average of {k})" if k > 1 else ""), "iteration", "cross-entropy")
    # NOTE: the main, PAM and CAM losses run close together: drawn widest first, each stays visible beneath the next
    widths = {"loss": 3, "loss_out": 8, "loss_pam": 5, "loss_cam": 3, "loss_aux": 2}
    for (key, name), color in zip(parts, SERIES_COLORS, strict=False):
        ax.line(iters, series[key], color, name, width=widths[key])
    ax.draw_legend()
    ax.paste_ylabel(img, panels[0][0] - 80)

    lrs = [r.get("lr", math.nan) for r in train]
    ax = Axes(d, panels[1], xlim, (0, max([v for v in lrs if math.isfinite(v)] or [0.01]) * 1.05))
    ax.frame("learning rate (poly)", "iteration", "lr")
    if train:
        ax.line(iters, lrs, SERIES_COLORS[0])
    ax.paste_ylabel(img, panels[1][0] - 80)

    vi = [r["iter"] for r in val]
    ax = Axes(d, panels[2], xlim, (0, 100))
    ax.frame("validation", "iteration", "percent")
    for key, color in (("mIoU", SERIES_COLORS[3]), ("mAcc", SERIES_COLORS[2]), ("aAcc", SERIES_COLORS[4])):
        ax.line(vi, [r.get(key) for r in val], color, key, markers=True)
    if val:
        x, y = ax.px(vi[-1], val[-1]["mIoU"])
        low = y > panels[2][3] - 30  # NOTE: near the x axis the value goes above its point, clear of the ticks
        d.text((x - 6, y - 8 if low else y + 8), f"{val[-1]['mIoU']:.1f}", fill=SERIES_COLORS[3], font=font(14),
               anchor="rb" if low else "rt")  # fmt: skip
    else:
        left, t, r, b = panels[2]
        d.text(((left + r) / 2, (t + b) / 2), "no validation yet", fill=(120, 120, 120), font=font(15), anchor="mm")
    # the legend in the right-hand corner away from the last points (low percentages: at the top)
    ax.draw_legend("top" if val and min(val[-1].get(k) or 0 for k in ("mIoU", "mAcc")) < 50 else "bottom")
    ax.paste_ylabel(img, panels[2][0] - 80)
    return save_picture(img, path)


def plot_class_iou(
    classes: Sequence[str],
    ious: Sequence[float | None],
    path: str | Path,
    title: str = "per-class IoU",
    palette: Sequence[Sequence[int]] | None = None,
    miou: float | None = None,
) -> Path:
    """Horizontal bars of the per-class IoU (percent), in the class colours, with the mIoU as a dashed line."""
    n = len(classes)
    row = 30 if n <= 12 else 22 if n <= 40 else 16
    f = font(14 if n <= 40 else 11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max([int(probe.textlength(str(c), font=f)) for c in classes] + [40]) + 20
    left, right, top = name_w + 20, 90, 70
    w, h = left + 620 + right, top + n * row + 70
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (left, top, w - right, top + n * row)
    ax = Axes(d, box, (0, 100), (0, 1))
    left, t, r, b = box
    for v in ax.xt:
        x, _ = ax.px(v, 0)
        d.line([(x, t), (x, b)], fill=(232, 232, 232))
        d.line([(x, b), (x, b + 5)], fill=(60, 60, 60))
        d.text((x, b + 8), f"{v:g}", fill=(60, 60, 60), font=font(13), anchor="mt")
    if miou is not None and math.isfinite(miou):
        x, _ = ax.px(miou, 0)
        for yy in range(t, b, 8):
            d.line([(x, yy), (x, min(yy + 4, b))], fill=(200, 0, 0), width=2)
        d.text((x, t - 6), f"mIoU {miou:.2f}", fill=(200, 0, 0), font=font(14), anchor="md")
    d.rectangle(box, outline=(60, 60, 60))  # first, so that value labels past 100 % stay readable
    colors = palette_array(palette)
    for i, (name, v) in enumerate(zip(classes, ious, strict=True)):
        y = t + i * row
        d.text((left - 8, y + row / 2), str(name), fill=(30, 30, 30), font=f, anchor="rm")
        if v is None or not math.isfinite(v):
            d.text((left + 6, y + row / 2), "n/a (absent)", fill=(140, 140, 140), font=f, anchor="lm")
            continue
        x, _ = ax.px(max(0.0, min(100.0, v)), 0)
        c = tuple(int(u) for u in colors[i % 256])
        d.rectangle([left, y + 3, max(left + 1, x), y + row - 3], fill=c, outline=(70, 70, 70))
        text = f"{v:.1f}"
        tw = d.textlength(text, font=f)
        d.rectangle([x + 3, y + 2, x + 9 + tw, y + row - 2], fill=(255, 255, 255))
        d.text((x + 6, y + row / 2), text, fill=(30, 30, 30), font=f, anchor="lm")
    d.text((w / 2, 12), title, fill=(0, 0, 0), font=font(18), anchor="mt")
    d.text(((left + r) / 2, b + 30), "IoU (%)", fill=(30, 30, 30), font=font(15), anchor="mt")
    return save_picture(img, path)


def plot_confusion(
    classes: Sequence[str], matrix, path: str | Path, title: str = "confusion matrix", normalize: bool = True
) -> Path:
    """The `(K, K)` confusion matrix (rows: label, columns: prediction) as a heat map, each row in percent of its
    labelled pixels (what each class is predicted as; the diagonal is its accuracy). Up to 25 classes the cells
    carry their values; up to 60 the axes name the classes, beyond that every 10th index. Rows of classes absent from
    the labels are grey."""
    m = np.asarray(matrix, dtype=np.float64)
    classes = [str(c) if len(str(c)) <= 30 else str(c)[:29] + "…" for c in classes]
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix {m.shape} for {k} classes")
    rows = m.sum(1, keepdims=True)
    share = np.where(rows > 0, m / np.maximum(rows, 1), np.nan) * 100 if normalize else m
    cell = 36 if k <= 25 else 14 if k <= 60 else max(4, 900 // k)
    named = k <= 60
    f = font(13 if k <= 25 else 11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(str(c), font=f)) for c in classes) + 16 if named else 40
    left, top = label_w + 40, label_w + 70
    side = k * cell
    title_w = math.ceil(probe.textlength(title, font=font(18)))
    w, h = max(left + side + 110, title_w + 40), top + max(side, 130) + 30
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    top_v = 100.0 if normalize else float(np.nanmax(share)) if np.isfinite(share).any() else 1.0  # the scale's top
    for i in range(k):
        for j in range(k):
            v = share[i, j]
            x, y = left + j * cell, top + i * cell
            if not math.isfinite(v):
                d.rectangle([x, y, x + cell, y + cell], fill=(215, 215, 215))
                continue
            d.rectangle([x, y, x + cell, y + cell], fill=_heat(v / (top_v or 1)))
            if k <= 25 and v >= 0.5:
                ink = (255, 255, 255) if v / (top_v or 1) > 0.55 else (30, 30, 30)
                d.text((x + cell / 2, y + cell / 2), f"{v:.0f}", fill=ink, font=font(11), anchor="mm")
    d.rectangle([left, top, left + side, top + side], outline=(60, 60, 60))
    marks = range(k) if named else range(0, k, 10)
    for i in marks:
        text = str(classes[i]) if named else str(i)
        d.text((left - 6, top + i * cell + cell / 2), text, fill=(30, 30, 30), font=f, anchor="rm")
        tw = int(probe.textlength(text, font=f)) + 4
        tag = Image.new("RGB", (tw, 16), (255, 255, 255))
        ImageDraw.Draw(tag).text((2, 8), text, fill=(30, 30, 30), font=f, anchor="lm")
        tag = tag.rotate(90, expand=True)
        img.paste(tag, (int(left + i * cell + cell / 2 - 8), top - 6 - tag.height))
    d.text((min(max(left + side / 2, title_w / 2 + 20), w - title_w / 2 - 20), 12), title, fill=(0, 0, 0),
           font=font(18), anchor="mt")  # fmt: skip
    d.text((left + side / 2, 36), "predicted class", fill=(60, 60, 60), font=font(14), anchor="mt")
    label = Image.new("RGB", (120, 18), (255, 255, 255))
    ImageDraw.Draw(label).text((60, 9), "labelled class", fill=(60, 60, 60), font=font(14), anchor="mm")
    label = label.rotate(90, expand=True)
    img.paste(label, (6, int(top + max(side, 130) / 2 - label.height / 2)))
    bar_x, bar_h = left + side + 25, min(side, 300)  # the colour scale
    for yy in range(bar_h):
        d.line([(bar_x, top + yy), (bar_x + 16, top + yy)], fill=_heat(1 - yy / max(bar_h - 1, 1)))
    d.rectangle([bar_x, top, bar_x + 16, top + bar_h], outline=(60, 60, 60))
    unit = "%" if normalize else ""
    d.text((bar_x + 22, top), f"{top_v:.0f}{unit}", fill=(30, 30, 30), font=font(12), anchor="lt")
    d.text((bar_x + 22, top + bar_h), f"0{unit}", fill=(30, 30, 30), font=font(12), anchor="lb")
    return save_picture(img, path)


def _heat(t: float) -> tuple[int, int, int]:
    """White (0) -> dark blue (1)."""
    t = min(max(t, 0.0), 1.0) ** 0.5  # NOTE: a square root, so that small confusions show
    return (int(255 - 247 * t), int(255 - 207 * t), int(255 - 148 * t))


def legend_image(classes: Sequence[str], palette: Sequence[Sequence[int]] | None) -> Image.Image:
    """The classes' colours and names, one row each (what the label maps and overlays mean)."""
    f = font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [f"{i} {name}" for i, name in enumerate(classes)]
    cols = 1 if len(rows) <= 40 else 3
    per = -(-len(rows) // cols)
    col_w = max(int(probe.textlength(r, font=f)) for r in rows) + 50
    img = Image.new("RGB", (cols * col_w + 20, per * 22 + 20), (255, 255, 255))
    d = ImageDraw.Draw(img)
    colors = palette_array(palette)
    for i, text in enumerate(rows):
        x, y = 10 + (i // per) * col_w, 10 + (i % per) * 22
        d.rectangle([x, y + 3, x + 28, y + 19], fill=tuple(int(u) for u in colors[i % 256]), outline=(70, 70, 70))
        d.text((x + 36, y + 11), text, fill=(30, 30, 30), font=f, anchor="lm")
    return img


def save_picture(img: Image.Image, path: str | Path, **save_args) -> Path:
    """Save through a temporary file beside `path` and os.replace: a failed write (a full disk) leaves no partial
    picture and keeps the previous one; the OSError, naming `path`, goes up (the commands turn it into one line).
    A symbolic link keeps pointing to the new picture; a device or pipe is refused (`files.replace_target`)."""
    path = replace_target(path)
    tmp = temp_beside(path, "part-")
    try:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **save_args)
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)  # NOTE: not the temporary name
        raise
    finally:
        discard(tmp)
    return path
