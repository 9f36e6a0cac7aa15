"""The bundled synthetic dataset: deterministic bytes, generated once and atomically, readable by build_dataset."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from danet.data import build_dataset
from danet.data.synthetic import MANIFEST, SPLITS, ensure_synthetic, generate
from danet.errors import DanetError
from danet.presets import get_preset


def digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("cache"))


def test_generated_once_into_a_versioned_folder(synthetic_root, monkeypatch, tmp_path):
    assert synthetic_root.name == "synthetic-v1" and (synthetic_root / MANIFEST).is_file()
    assert [p.name for p in synthetic_root.parent.iterdir()] == ["synthetic-v1"]  # no temporary folder left
    for split, count in SPLITS.items():
        assert len(list((synthetic_root / "images" / split).glob("*.jpg"))) == count
        assert len(list((synthetic_root / "masks" / split).glob("*.png"))) == count
    stamp = (synthetic_root / MANIFEST).stat().st_mtime_ns
    assert ensure_synthetic(synthetic_root.parent) == synthetic_root  # idempotent: not generated again
    assert (synthetic_root / MANIFEST).stat().st_mtime_ns == stamp
    monkeypatch.setenv("DANET_CACHE", str(synthetic_root.parent))
    assert ensure_synthetic() == synthetic_root
    (tmp_path / "synthetic-v1").mkdir()  # a half-made folder is reported, not silently used
    with pytest.raises(DanetError, match="incomplete"):
        ensure_synthetic(tmp_path)


def test_same_bytes_every_time(synthetic_root, tmp_path):
    generate(tmp_path / "again")
    assert digest(tmp_path / "again") == digest(synthetic_root)


def test_readable_and_learnable_looking(synthetic_root, monkeypatch):
    preset = get_preset("danet_tiny_synthetic")
    monkeypatch.setenv("DANET_CACHE", str(synthetic_root.parent))
    train = build_dataset(preset, None, "train")  # no root: the bundled data
    val = build_dataset(preset, synthetic_root, "val")
    assert len(train) == preset.dataset.num_train == SPLITS["training"] and len(val) == SPLITS["validation"]
    assert train.classes == ("background", "disc", "square", "triangle", "stripes")
    img, lab = train[0]
    assert img.shape == (3, *preset.crop_size) and lab.shape == preset.crop_size
    img, lab = val[0]
    # the preset tests at 1.5x the scenes' 128 px; the label stays at its own size (the metric is taken there)
    assert img.shape == (3, 192, 192) and lab.shape == (128, 128) and lab.dtype == torch.int64
    counts = sum(np.bincount(val.read(i)[1].ravel(), minlength=5) for i in range(len(val)))
    share = counts / counts.sum()
    assert (share > 0.02).all() and share[0] < 0.9  # every class present, background not everything
    # classes differ in colour: mean hue families of disc (red) and square (green) pixels
    reds = greens = 0.0
    for i in range(10):
        image, label = val.read(i)
        if (label == 1).any() and (label == 2).any():
            reds += image[label == 1][:, 0].mean() - image[label == 2][:, 0].mean()
            greens += image[label == 2][:, 1].mean() - image[label == 1][:, 1].mean()
    assert reds > 0 and greens > 0
