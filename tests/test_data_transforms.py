"""The training pipeline: sizes, padding, flip consistency, the cat_max_ratio rule, reproducibility, workers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from danet.data import build_dataset, worker_init_fn
from danet.data.transforms import (
    TrainPipeline,
    keep_ratio_size,
    pad_to,
    photometric_distortion,
    random_crop,
)
from test_data_layouts import make_ade, small

MEAN = np.array((123.675, 116.28, 103.53), np.float32)
STD = np.array((58.395, 57.12, 57.375), np.float32)


def scene(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 5, (h, w)).astype(np.uint8)


def test_keep_ratio_size_formula():
    assert keep_ratio_size(512, 683, (2048, 512)) == (683, 512)
    assert keep_ratio_size(1024, 2048, (2048, 512)) == (1024, 512)
    assert keep_ratio_size(100, 3000, (2048, 512)) == (2048, 68)  # the long side binds
    assert keep_ratio_size(300, 200, (512, 2048)) == (512, 768)  # the short side binds; target order does not matter


def test_output_sizes_and_centred_padding():
    image, label = scene(30, 40)
    pipe = TrainPipeline(base_size=(40, 30), crop_size=(64, 64), ratio_range=(1.0, 1.0))
    img, lab = pipe(image, label, np.random.default_rng(0))
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert lab.shape == (64, 64) and lab.dtype == torch.int64
    # 40x30 stays 40x30 (ratio 1), so 24 columns and 34 rows of padding, split evenly around the image
    assert (lab[:17] == 255).all() and (lab[-17:] == 255).all() and (lab[:, :12] == 255).all()
    assert (lab[:, -12:] == 255).all() and (lab[17:47, 12:52] != 255).all()
    assert (img[:, :17] == 0).all() and (img[:, :, -12:] == 0).all()
    assert (img[:, 17:47, 12:52] != 0).any()


def test_pad_to_leaves_full_size_alone():
    img, lab = torch.ones(3, 8, 8), torch.zeros(8, 8, dtype=torch.long)
    a, b = pad_to(img, lab, (8, 8))
    assert a is img and b is lab


def test_flip_moves_image_and_label_together():
    image, label = scene(64, 96)
    kw = dict(base_size=(96, 64), crop_size=(48, 48), ratio_range=(1.0, 1.0))
    for seed in range(4):
        a_img, a_lab = TrainPipeline(**kw, flip_prob=0.0)(image, label, np.random.default_rng(seed))
        b_img, b_lab = TrainPipeline(**kw, flip_prob=1.0)(image, label, np.random.default_rng(seed))
        # every other random draw is the same, so the flipped run is the mirror image of the other
        assert torch.equal(b_lab, a_lab.flip(-1))
        # NOTE: OpenCV's HSV -> RGB conversion rounds a pixel differently depending on its position in the row
        # (vector vs scalar code), so after a saturation/hue change the images agree up to 1-2 grey levels
        diff = (b_img - a_img.flip(-1)).abs()
        assert diff.max() <= 2.5 / 57 and (diff > 0).float().mean() < 0.5


def test_label_follows_image_content():
    """Without colour jitter that matters, each class keeps its own grey level wherever crop/flip put it."""
    h, w = 50, 70
    label = np.zeros((h, w), np.uint8)
    label[:, 30:] = 1
    label[10:20, 5:15] = 255
    image = np.where(label[..., None] == 1, 220, 40).astype(np.uint8).repeat(3, 2)
    for seed in range(6):
        img, lab = TrainPipeline((70, 50), (32, 32), (0.8, 1.5))(image, label, np.random.default_rng(seed))
        grey = img.mean(0)
        if (lab == 0).any() and (lab == 1).any():
            assert grey[lab == 1].mean() > grey[lab == 0].mean()


def test_reproducible_from_the_generator():
    image, label = scene()
    pipe = TrainPipeline(base_size=(80, 60), crop_size=(40, 40))
    a = pipe(image, label, np.random.default_rng([1, 2, 3]))
    b = pipe(image, label, np.random.default_rng([1, 2, 3]))
    c = pipe(image, label, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _valid(crop: np.ndarray, ratio=0.75) -> bool:
    counts = np.bincount(crop.ravel(), minlength=256)[:255]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_rule_redraws_and_excludes_ignore():
    # columns 0-59 class 1, 60-139 class 0, 140-199 ignore; a 100-wide crop is valid only when left < 35
    label = np.zeros((100, 200), np.uint8)
    label[:, :60] = 1
    label[:, 140:] = 255
    image = np.zeros((100, 200, 3), np.uint8)
    with_rule = [_valid(random_crop(image, label, (100, 100), np.random.default_rng(s))[1]) for s in range(60)]
    without = [_valid(random_crop(image, label, (100, 100), np.random.default_rng(s), 1.0)[1]) for s in range(60)]
    assert np.mean(with_rule) >= 0.9  # 1 - 0.65**10 on average
    assert np.mean(without) < 0.6  # 35/101 on average
    img, lab = random_crop(image, label, (100, 100), np.random.default_rng(0))
    assert img.shape == (100, 100, 3) and lab.shape == (100, 100)
    # a crop larger than the image keeps the image size
    img, lab = random_crop(image[:50, :60], label[:50, :60], (100, 100), np.random.default_rng(0))
    assert lab.shape == (50, 60)


def test_photometric_distortion_ranges():
    flat = np.full((8, 8, 3), 128, np.uint8)
    changed, grey = 0, True
    for s in range(160):
        out = photometric_distortion(flat, np.random.default_rng(s))
        assert out.dtype == np.uint8 and out.shape == flat.shape
        changed += not np.array_equal(out, flat)
        grey &= bool((out == out[..., :1]).all())  # hue/saturation leave a grey image grey
        lo, hi = int(out.min()), int(out.max())
        assert 128 * 0.5 * 0.5 - 32 <= lo and hi <= (128 + 32) * 1.5  # brightness +-32, contrast 0.5..1.5
    assert grey and 0.6 * 160 <= changed <= 0.9 * 160  # 1/4 keep it (neither brightness nor contrast drawn)


def _dataset(tmp_path, seed=0):
    root = make_ade(tmp_path / "ade", {"training": 4}, h=40, w=60)
    return build_dataset(small("danet_r50-d8_ade20k", base=(60, 40), crop=(32, 32)), root, "train", seed=seed)


def test_dataset_items_seeded_by_seed_epoch_index(tmp_path):
    ds = _dataset(tmp_path)
    a = ds[1]
    assert torch.equal(a[0], ds[1][0])  # same seed, epoch, index
    ds.set_epoch(1)
    assert ds.epoch == 1 and not torch.equal(a[0], ds[1][0])
    ds.set_epoch(0)
    other = build_dataset(small("danet_r50-d8_ade20k", base=(60, 40), crop=(32, 32)), tmp_path / "ade", "train", seed=5)
    assert not torch.equal(a[0], other[1][0])
    key = ds[(1, 1234)]  # a sampler's own per-item seed
    assert torch.equal(key[0], ds[(1, 1234)][0]) and not torch.equal(key[0], a[0])


def test_worker_count_and_persistent_workers_do_not_change_items(tmp_path):
    ds = _dataset(tmp_path)
    assert cv2.getNumThreads() == 1  # NOTE: building a dataset makes OpenCV sequential, fork-safe (io.fork_safe_opencv)
    ds.set_epoch(3)
    expect = torch.stack([ds[i][0] for i in range(4)])
    ds.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, persistent_workers=True, worker_init_fn=worker_init_fn
    )
    first = torch.cat([b[0] for b in loader])
    ds.set_epoch(3)  # seen by the persistent workers through shared memory
    third = torch.cat([b[0] for b in loader])
    assert torch.equal(third, expect) and not torch.equal(first, expect)


def test_training_items_batch_and_are_normalised(tmp_path):
    ds = _dataset(tmp_path)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)
    # undo the normalisation: pixel values 0..255 (padding, if any, is 0 in normalised units)
    raw = images.permute(0, 2, 3, 1).numpy() * STD + MEAN
    assert raw.min() > -0.01 and raw.max() < 255.01


def test_pipeline_settings_are_checked():
    from danet.data.transforms import EvalPipeline
    from danet.errors import DanetError

    for kw, text in (
        (dict(crop_size=(0, 0)), "crop size"),
        (dict(base_size=(512,)), "base size"),
        (dict(ratio_range=(2.0, 0.5)), "ratio range"),
        (dict(cat_max_ratio=0.0), "cat_max_ratio"),
    ):
        with pytest.raises(DanetError, match=text):
            TrainPipeline(**{"base_size": (64, 32), "crop_size": (32, 32), **kw})
    with pytest.raises(DanetError, match="base size"):
        EvalPipeline((0, 512))
