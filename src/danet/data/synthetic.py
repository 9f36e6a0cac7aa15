"""The bundled synthetic dataset: small scenes of textured shapes, generated once into a cache folder.

Five classes (danet.classes.SYNTHETIC_CLASSES): 0 background, 1 disc, 2 square, 3 triangle, 4 stripes. Each
class has a shape, a colour family and a texture, but none of the three alone decides it: a fifth of the objects
take a random colour, backgrounds carry low-frequency colour noise and line clutter, objects overlap and leave the
frame, and every image gets lighting, blur and sensor noise, then JPEG compression. Labels are 0..4 (no ignore
pixels, no zero-label shift).

Layout (the folder-dataset layout, see danet.data.folder), under `$DANET_CACHE` (default ~/.cache/danet):
    synthetic-v1/classes.yaml, synthetic.json (the manifest)
    synthetic-v1/images/{training,validation}/NNNNN.jpg    128 x 128 RGB
    synthetic-v1/masks/{training,validation}/NNNNN.png     palette PNG of class indices

Image i of a split is drawn from default_rng([SEED, split number, i]): the same bytes on every run of a given
numpy/OpenCV/Pillow build. Generation takes about a second.
"""

from __future__ import annotations

import colorsys
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..classes import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from ..errors import DanetError

VERSION = 1
SIZE = 128
SEED = 2019
SPLITS = {"training": 400, "validation": 50}
MANIFEST = "synthetic.json"
JPEG_QUALITY = 90
# hue ranges (degrees) of the object classes' colour families
HUES = {1: (-25.0, 10.0), 2: (90.0, 150.0), 3: (35.0, 65.0), 4: (195.0, 245.0)}


def cache_dir() -> Path:
    """`$DANET_CACHE`, or ~/.cache/danet."""
    return Path(os.environ.get("DANET_CACHE") or Path.home() / ".cache" / "danet").expanduser()


def ensure_synthetic(root: str | os.PathLike | None = None) -> Path:
    """The synthetic data root, `<root or cache_dir()>/synthetic-v1`, generated on first use.

    Generation happens in a temporary folder beside the target, renamed into place when complete, so a crash
    leaves nothing half-written and concurrent callers (e.g. several ranks) all end up with the same folder.
    """
    base = Path(root).expanduser() if root is not None else cache_dir()
    target = base / f"synthetic-v{VERSION}"
    if (target / MANIFEST).is_file():
        return target
    if target.exists():
        raise DanetError(f"{target} exists but holds no {MANIFEST} (an incomplete copy?); delete it and retry")
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".synthetic-v{VERSION}.", dir=base))
    except OSError as e:
        msg = f"cannot create the synthetic data under {base} ({e}); set DANET_CACHE to a writable folder"
        raise DanetError(msg) from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        generate(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate(out: Path) -> None:
    """Write the whole dataset into the (empty) folder `out`."""
    palette = np.zeros(768, dtype=np.uint8)
    palette[: 3 * len(SYNTHETIC_PALETTE)] = np.asarray(SYNTHETIC_PALETTE, dtype=np.uint8).ravel()
    for split_no, (split, count) in enumerate(SPLITS.items()):
        (out / "images" / split).mkdir(parents=True)
        (out / "masks" / split).mkdir(parents=True)
        for i in range(count):
            image, label = render_scene(np.random.default_rng([SEED, split_no, i]), SIZE)
            ok, jpg = cv2.imencode(
                ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            assert ok
            (out / "images" / split / f"{i:05d}.jpg").write_bytes(jpg.tobytes())
            mask = Image.fromarray(label, mode="P")
            mask.putpalette(palette.tolist())
            mask.save(out / "masks" / split / f"{i:05d}.png", optimize=False)
    classes = "\n".join(
        f"  - {{name: {n}, color: [{r}, {g}, {b}]}}"
        for n, (r, g, b) in zip(SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, strict=True)
    )
    (out / "classes.yaml").write_text(f"classes:\n{classes}\n")
    manifest = {"name": "danet synthetic scenes", "version": VERSION, "size": SIZE, "seed": SEED, "splits": SPLITS}
    manifest["classes"] = list(SYNTHETIC_CLASSES)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _colour(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]):
    h = (rng.uniform(*hue) % 360.0) / 360.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)), dtype=np.float32) * 255.0


def _noise_field(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Smooth noise `(size, size, channels)` in about -1..1 (random grid upsampled bicubically)."""
    grid = rng.normal(0.0, 1.0, (cells, cells, channels)).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return field.reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    sat = (0.3, 0.65) if rng.random() < 0.2 else (0.03, 0.35)  # sometimes a colourful background (a confuser)
    base = _colour(rng, (0, 360), sat, (0.25, 0.85))
    img = base + _noise_field(rng, size, int(rng.integers(3, 8))) * rng.uniform(10, 35)
    for _ in range(int(rng.integers(0, 5))):  # clutter lines, labelled background
        p1, p2 = rng.integers(-10, size + 10, 2), rng.integers(-10, size + 10, 2)
        colour = np.clip(base + rng.normal(0, 50, 3), 0, 255).tolist()
        cv2.line(img, tuple(map(int, p1)), tuple(map(int, p2)), colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A filled shape of class `cls` as a uint8 mask `(size, size)`, with its centre and radius."""
    mask = np.zeros((size, size), np.uint8)
    cx, cy = rng.uniform(-0.1, 1.1, 2) * size
    angle = rng.uniform(0, 180)
    if cls == 1:  # disc (or slightly elliptic)
        r = rng.uniform(8, 32)
        axes = (int(round(r)), int(round(r * rng.uniform(0.75, 1.0))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, angle, 0, 360, 1, -1)
    elif cls == 2:  # square (or nearly)
        r = rng.uniform(8, 28)
        box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.8, 1.0)), angle))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif cls == 3:  # triangle
        r = rng.uniform(10, 36)
        t = np.deg2rad(angle + np.array([0.0, 120.0, 240.0]) + rng.uniform(-15, 15, 3))
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # stripes: a striped rectangle or ellipse (texture decides the class)
        r = rng.uniform(10, 34)
        if rng.random() < 0.5:
            box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.5, 1.0)), angle))
            cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
        else:
            axes = (int(round(r)), int(round(r * rng.uniform(0.5, 1.0))))
            cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, angle, 0, 360, 1, -1)
    return mask, (cx, cy, r)


def _texture(
    rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float, float]
) -> np.ndarray:
    """The object's appearance `(h, w, 3)` float32 at pixel coordinates yy, xx `(h, w)` (only its mask is used)."""
    hue = (0.0, 360.0) if rng.random() < 0.2 else HUES[cls]  # a fifth of the objects take any colour
    colour = _colour(rng, hue, (0.55, 1.0), (0.55, 1.0))
    cx, cy, r = centre
    if cls == 1:  # shaded like a sphere
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / max(r, 1.0) ** 2
        tex = colour * (1.05 - 0.4 * np.clip(d2, 0, 1))[..., None]
    elif cls == 2:  # fine checker
        period = int(rng.integers(3, 7))
        checker = ((xx.astype(np.int32) // period + yy.astype(np.int32) // period) % 2) * 2.0 - 1.0
        tex = colour + (checker * rng.uniform(10, 22))[..., None]
    elif cls == 3:  # flat with a linear gradient
        g = rng.normal(0, 1, 2)
        tex = colour + (((xx - cx) * g[0] + (yy - cy) * g[1]) * 0.8)[..., None]
    else:  # sinusoidal stripes between the colour and a pale one
        period, theta = rng.uniform(4, 10), rng.uniform(0, np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        pale = _colour(rng, (0, 360), (0.0, 0.2), (0.8, 1.0))
        tex = colour * wave[..., None] + pale * (1 - wave[..., None])
    return tex.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates yy, xx `(size, size)` float32 (read only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def render_scene(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image RGB uint8 `(size, size, 3)`, label uint8 `(size, size)` with classes 0..4."""
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    yy, xx = _grid(size)
    for _ in range(int(rng.integers(3, 9))):
        cls = int(rng.integers(1, 5))
        mask, centre = _shape_mask(rng, cls, size)
        x, y, w, h = cv2.boundingRect(mask)
        if w == 0:
            continue
        # work in the mask's bounding box, 2 pixels wider for the soft edge
        box = (slice(max(y - 2, 0), min(y + h + 2, size)), slice(max(x - 2, 0), min(x + w + 2, size)))
        tex = _texture(rng, cls, yy[box], xx[box], centre)
        alpha = cv2.GaussianBlur(mask[box].astype(np.float32), (3, 3), 0.6)[..., None]  # soft (anti-aliased) edges
        img[box] = img[box] * (1 - alpha) + tex * alpha
        label[box][mask[box] > 0] = cls
    gx, gy = rng.uniform(-0.25, 0.25, 2)  # lighting: a gentle brightness plane
    img *= (1.0 + gx * (xx / size - 0.5) + gy * (yy / size - 0.5))[..., None]
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (5, 5), rng.uniform(0.5, 1.1))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3, 10))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label
