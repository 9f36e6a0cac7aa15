"""Pictures: palettes, palette PNGs, overlays, training curves and the per-class IoU chart."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from danet import viz
from danet.presets import get_preset

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75)]


def test_palette_png_keeps_indices_and_colours(tmp_path):
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    viz.save_label_png(tmp_path / "l.png", label, PALETTE)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P"
    assert np.array_equal(np.asarray(img), label)
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[0, 1]) == (230, 25, 75) and tuple(rgb[1, 1]) == viz.IGNORE_COLOR


def test_palette_beyond_the_given_colours_is_distinct():
    table = viz.palette_array(PALETTE)
    assert table.shape == (256, 3) and tuple(table[1]) == (230, 25, 75)
    assert len({tuple(c) for c in table[:255]}) == 255


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    label = np.array([[1, 0], [255, 2]])
    out = viz.overlay(image, label, PALETTE, alpha=0.5)
    assert tuple(out[0, 0]) == (165, 62, 88)  # (100 + 230) / 2 ...
    assert tuple(out[1, 0]) == (100, 100, 100)


def test_training_curves_png(tmp_path):
    records = [
        {"type": "train", "iter": i, "loss": 3 / i, "loss_out": 1 / i, "lr": 0.01 * (1 - i / 100)}
        for i in range(1, 100)
    ]
    records += [{"type": "val", "iter": 50, "mIoU": 40.0, "mAcc": 50.0, "aAcc": 80.0}]
    records += [{"type": "val", "iter": 99, "mIoU": 60.0, "mAcc": 70.0, "aAcc": 90.0}]
    path = viz.plot_training_curves(records, tmp_path / "c.png", title="t")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] > img.shape[0] > 300
    assert (img == viz.SERIES_COLORS[3]).all(-1).sum() > 50  # the mIoU line is drawn
    assert (img == viz.SERIES_COLORS[0]).all(-1).sum() > 200  # the loss and lr lines are drawn
    viz.plot_training_curves([], tmp_path / "empty.png")  # nothing logged yet: still a picture


def test_class_iou_chart(tmp_path):
    p = get_preset("danet_r50-d8_ade20k")
    ious = [float(i % 100) for i in range(150)]
    ious[3] = math.nan
    path = viz.plot_class_iou(p.classes, ious, tmp_path / "iou.png", palette=p.palette, miou=42.0)
    w, h = Image.open(path).size
    assert h > 150 * 10 and w > 600
    colours = [(200, 10, 10), (10, 10, 200)]
    small = viz.plot_class_iou(["a", "b"], [10.0, 90.0], tmp_path / "s.png", palette=colours, miou=50.0)
    img = np.asarray(Image.open(small).convert("RGB"))
    assert (img == colours[1]).all(-1).sum() > 5 * (img == colours[0]).all(-1).sum() > 0  # b's bar is 9x longer


def test_nice_ticks():
    assert viz.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert viz.nice_ticks(0, 0.0105)[:3] == [0, 0.0025, 0.005]
    assert viz.tick_label(0.0025, 0.0025) == "0.0025"


def test_a_picture_that_fails_to_write_leaves_the_previous_one(tmp_path, monkeypatch):
    """Pictures go through a temporary file: a full disk keeps the earlier picture and leaves no partial file."""
    import errno

    path = viz.plot_class_iou(["a", "b"], [50.0, 70.0], tmp_path / "iou.png")
    before = path.read_bytes()

    def half_then_full(self, fp, *a, **k):
        open(fp, "wb").write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        viz.plot_class_iou(["a", "b"], [10.0, 20.0], tmp_path / "iou.png")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["iou.png"]


def test_confusion_picture(tmp_path):
    """Rows in percent of their labels: a 100 % cell in the darkest colour, 90 / 10 % in lighter ones, a row with no
    labels grey; 150 classes fit; a matrix of another size is refused."""
    m = [[90, 10, 0], [0, 50, 0], [0, 0, 0]]
    img = np.asarray(Image.open(viz.plot_confusion(["a", "b", "c"], m, tmp_path / "c.png")).convert("RGB"))
    count = lambda rgb: int((img == rgb).all(-1).sum())  # noqa: E731
    assert count(viz._heat(1.0)) > 300 and count(viz._heat(0.9)) > 300 and count(viz._heat(0.1)) > 300
    assert count((215, 215, 215)) > 3 * 30 * 30  # the absent class's row
    assert viz._heat(1.0) != viz._heat(0.9) != viz._heat(0.1) != (255, 255, 255)
    big = viz.plot_confusion([f"c{i}" for i in range(150)], np.eye(150) * 5, tmp_path / "big.png")
    assert 900 <= Image.open(big).size[0] < 1400
    title = "danet_r50-d8_ade20k (TTA whole): confusion"
    small = Image.open(viz.plot_confusion(["background", "crack"], [[5, 0], [0, 5]], tmp_path / "s.png", title))
    assert small.size[0] >= viz.ImageDraw.Draw(small).textlength(title, font=viz.font(18)) + 40  # the title fits
    long = Image.open(viz.plot_confusion(["x" * 200, "y"], [[5, 0], [0, 5]], tmp_path / "l.png"))
    assert long.size[0] < 600  # names are cut at 30 characters
    with pytest.raises(ValueError, match="for 2 classes"):
        viz.plot_confusion(["a", "b"], m, tmp_path / "x.png")


def test_class_names_beyond_ascii_are_drawn_where_the_machine_has_a_font(tmp_path):
    f = viz.font(14)
    missing = bytes(f.getmask("\uffff"))  # the font's "no such glyph" box
    if getattr(f, "path", None):  # a system font (DejaVu Sans, Noto Sans, ...): Latin, Greek and Cyrillic letters
        for name in ("café", "Straße", "дорога", "α"):
            assert all(bytes(f.getmask(ch)) != missing for ch in name), name
    else:  # no system font: Pillow's own, ASCII only; the pictures are still drawn
        assert bytes(f.getmask("a")) != missing
    out = viz.plot_class_iou(["café", "дорога"], [50.0, 70.0], tmp_path / "iou.png")
    assert Image.open(out).size[0] > 100
