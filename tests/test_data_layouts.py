"""Dataset layouts (ADE20K, Cityscapes, VOC, folder) built under tmp_path, items, label mappings and the errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from danet.data import build_dataset, folder_info
from danet.data.io import read_image, read_label
from danet.errors import DanetError
from danet.presets import get_preset


def small(preset_name: str, base=(96, 48), crop=(48, 48)):
    """A preset with small sizes so that the tests run fast."""
    p = get_preset(preset_name)
    return p.replace(dataset=dataclasses.replace(p.dataset, base_size=base, crop_size=crop))


def write_image(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def write_label(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def make_ade(root: Path, n: dict | None = None, h: int = 40, w: int = 60) -> Path:
    for split, count in (n or {"training": 3, "validation": 2}).items():
        for i in range(count):
            write_image(root / "ADEChallengeData2016/images" / split / f"ADE_{i:03d}.jpg", h, w, i)
            lab = np.random.default_rng(i).integers(0, 151, (h, w))
            write_label(root / "ADEChallengeData2016/annotations" / split / f"ADE_{i:03d}.png", lab)
    return root


def test_ade20k_items_and_reduce_zero_label(tmp_path):
    root = make_ade(tmp_path / "ade")
    preset = small("danet_r50-d8_ade20k")
    train = build_dataset(preset, root, "train")
    assert len(train) == 3 and train.train and train.split == "training"
    assert train.num_classes == 150 and len(train.classes) == 150 and len(train.palette) == 150
    assert [p[0].name for p in train.files] == ["ADE_000.jpg", "ADE_001.jpg", "ADE_002.jpg"]
    img, lab = train[0]
    assert img.dtype == torch.float32 and img.shape == (3, 48, 48)
    assert lab.dtype == torch.int64 and lab.shape == (48, 48)
    val = build_dataset(preset, root, "val")
    assert not val.train and len(val) == 2
    img, lab = val[1]
    assert img.shape == (3, 48, 72)  # keep-ratio to (96, 48): 40x60 -> 48x72
    assert lab.shape == (40, 60)  # original resolution
    raw = np.asarray(Image.open(val.files[1][1]))
    expect = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # NOTE: 0 -> ignore, 1..150 -> 0..149
    assert (lab.numpy() == expect).all()
    # the literal split name works too, and the root may be the ADEChallengeData2016 folder itself
    assert len(build_dataset(preset, root / "ADEChallengeData2016", "validation")) == 2


def test_cityscapes_layout_and_prepare_hint(tmp_path):
    root = tmp_path / "cs"
    for split, city in (("train", "aachen"), ("val", "lindau")):
        for i in range(2):
            stem = f"{city}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 32, 64, i)
            lab = np.random.default_rng(i).integers(0, 19, (32, 64))
            lab[:4] = 255
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lab)
    preset = small("danet_r50-d8_cityscapes", base=(128, 64), crop=(32, 64))
    ds = build_dataset(preset, root, "val")
    assert len(ds) == 2 and ds.files[0][1].name == "lindau_000000_000019_gtFine_labelTrainIds.png"
    img, lab = ds[0]
    assert img.shape == (3, 64, 128) and lab.shape == (32, 64) and set(lab[:4].unique().tolist()) == {255}
    assert build_dataset(preset, root, "train")[0][0].shape == (3, 32, 64)
    # only the official labelIds there: the error says how to make trainIds
    bad = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png"
    bad.rename(bad.with_name("aachen_000001_000019_gtFine_labelIds.png"))
    with pytest.raises(
        DanetError,
        match=r"aachen_000001_000019_gtFine_labelTrainIds.png of image .* does not exist; .*prepare cityscapes",
    ):
        build_dataset(preset, root, "train")


def voc_lists(base: Path, **lists: list[str]) -> Path:
    """ImageSets/Segmentation/<name>.txt of each list of ids under the VOC2012 folder `base`; the folder."""
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for name, ids in lists.items():
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return sets


def test_voc_layout_label_dirs_and_palette_pngs(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2007_000039", "2008_000001"]
    for i, name in enumerate(ids):
        write_image(base / "JPEGImages" / f"{name}.jpg", 30, 40, i)
    official = np.full((30, 40), 3)
    official[:, :5] = 255
    write_label(base / "SegmentationClass" / f"{ids[0]}.png", official, palette=True)
    write_label(base / "SegmentationClassAug" / f"{ids[0]}.png", np.full((30, 40), 7))  # SBD: not used
    write_label(base / "SegmentationClassAug" / f"{ids[1]}.png", np.full((30, 40), 20))
    write_label(base / "SegmentationClass" / f"{ids[2]}.png", np.full((30, 40), 1), palette=True)
    sets = voc_lists(base, trainaug=ids[:2], val=ids[2:])
    preset = small("danet_r50-d8_voc12aug")
    train = build_dataset(preset, tmp_path / "VOCdevkit", "train", train=False)
    assert train.split == "trainaug" and len(train) == 2
    assert [f[1].parent.name for f in train.files] == ["SegmentationClass", "SegmentationClassAug"]
    lab0 = train[0][1]
    assert set(lab0.unique().tolist()) == {3, 255}  # palette indices, not colours
    assert set(train[1][1].unique().tolist()) == {20}
    assert len(build_dataset(preset, tmp_path, "val")) == 1
    with pytest.raises(DanetError, match=r"Segmentation/nolist\.txt does not exist"):
        build_dataset(preset, tmp_path, "nolist")  # a literal split without its list file
    (sets / "trainaug.txt").unlink()
    with pytest.raises(DanetError, match=r"trainaug\.txt does not exist.*prepare voc-aug"):
        build_dataset(preset, tmp_path, "train")


def make_folder(root: Path, classes_text: str | None = None, rgb_masks: bool = False) -> Path:
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    if classes_text is None:
        classes_text = "classes:\n" + "".join(
            f"  - {{name: {n}, color: {list(c)}}}\n" for n, c in zip(["bg", "cat", "dog"], palette, strict=True)
        )
        (root / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "classes.yaml").write_text(classes_text)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            write_image(root / "images" / split / "sub" / f"im{i}.png", 24, 32, i)
            lab = np.random.default_rng(i).integers(0, 3, (24, 32))
            path = root / "masks" / split / "sub" / f"im{i}.png"
            if rgb_masks:
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(palette, np.uint8)[lab]).save(path)
            else:
                write_label(path, lab)
    return root


@pytest.mark.parametrize("rgb_masks", [False, True])
def test_folder_dataset(tmp_path, rgb_masks):
    root = make_folder(tmp_path / "mine", rgb_masks=rgb_masks)
    info = folder_info(root, base_size=(64, 32), crop_size=(32, 32))
    assert info.classes == ("bg", "cat", "dog") and info.palette[1] == (255, 0, 0) and info.num_train == 3
    preset = get_preset("danet_r50-d8_ade20k").replace(dataset=info)
    val = build_dataset(preset, root, "val")
    _, lab = val[1]
    expect = np.random.default_rng(1).integers(0, 3, (24, 32))
    assert (lab.numpy() == expect).all()
    assert build_dataset(preset, root, "train")[2][0].shape == (3, 32, 32)


def test_folder_text_classes_and_list_file(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "classes.yaml").unlink()
    (root / "classes.txt").write_text("# name [colour]\nbg 0 0 0\nbig cat #ff0000\ndog\n")
    names, palette = folder_info(root).classes, folder_info(root).palette
    assert names == ("bg", "big cat", "dog") and palette[1] == (255, 0, 0) and len(palette[2]) == 3
    (root / "extra.txt").write_text("train/sub/im0\ntrain/sub/im2.png\n")
    preset = get_preset("danet_r50-d8_ade20k").replace(dataset=folder_info(root, base_size=(64, 32)))
    ds = build_dataset(preset, root, "extra", train=False)
    assert [f[0].name for f in ds.files] == ["im0.png", "im2.png"] and ds[1][1].shape == (24, 32)
    other = dataclasses.replace(preset.dataset, classes=("a", "b", "c"))
    with pytest.raises(DanetError, match="classes file"):
        build_dataset(preset.replace(dataset=other), root, "val")


def test_synthetic_preset_uses_the_folder_reader(tmp_path, monkeypatch):
    import danet.data as data

    monkeypatch.setattr(data, "ensure_synthetic", lambda: tmp_path / "nope")
    with pytest.raises(DanetError, match="does not exist"):
        build_dataset(get_preset("danet_tiny_synthetic"), None, "train")
    with pytest.raises(DanetError, match="needs a data root"):
        build_dataset(get_preset("danet_r50-d8_ade20k"), None, "train")


# ---- errors: each names the file and the problem ----


def test_error_missing_root_dir_and_empty_split(tmp_path):
    preset = small("danet_r50-d8_ade20k")
    with pytest.raises(DanetError, match=r"nowhere does not exist"):
        build_dataset(preset, tmp_path / "nowhere", "train")
    root = make_ade(tmp_path / "ade", {"training": 1})
    with pytest.raises(DanetError, match=r"images/validation does not exist"):
        build_dataset(preset, root, "val")
    (root / "ADEChallengeData2016/images/validation").mkdir()
    (root / "ADEChallengeData2016/annotations/validation").mkdir()
    with pytest.raises(DanetError, match=r"'validation'.* has no images"):
        build_dataset(preset, root, "val")


def test_error_missing_label(tmp_path):
    root = make_ade(tmp_path / "ade")
    (root / "ADEChallengeData2016/annotations/training/ADE_001.png").unlink()
    with pytest.raises(DanetError, match=r"label .*ADE_001\.png of image ADE_001\.jpg does not exist"):
        build_dataset(small("danet_r50-d8_ade20k"), root, "train")


def test_error_corrupt_image(tmp_path):
    root = make_ade(tmp_path / "ade")
    (root / "ADEChallengeData2016/images/training/ADE_001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = build_dataset(small("danet_r50-d8_ade20k"), root, "train")
    ds[0]
    with pytest.raises(DanetError, match=r"image .*ADE_001\.jpg is corrupt"):
        ds[1]
    (root / "ADEChallengeData2016/images/training/ADE_002.jpg").write_bytes(b"")
    with pytest.raises(DanetError, match=r"ADE_002\.jpg is an empty file"):
        ds[2]


def test_error_size_mismatch(tmp_path):
    root = make_ade(tmp_path / "ade")
    write_label(root / "ADEChallengeData2016/annotations/validation/ADE_000.png", np.ones((41, 60)))
    ds = build_dataset(small("danet_r50-d8_ade20k"), root, "val")
    with pytest.raises(DanetError, match=r"label .*ADE_000\.png is 60x41 but image .*ADE_000\.jpg is 60x40"):
        ds[0]


def test_error_label_values_out_of_range(tmp_path):
    root = make_ade(tmp_path / "ade")
    bad = np.ones((40, 60))
    bad[3, 3], bad[4, 4] = 151, 200
    write_label(root / "ADEChallengeData2016/annotations/training/ADE_002.png", bad)
    ds = build_dataset(small("danet_r50-d8_ade20k"), root, "train")
    with pytest.raises(DanetError, match=r"label .*ADE_002\.png has values \[151, 200\] outside the 150 classes"):
        ds[2]


def test_error_colour_and_16bit_labels(tmp_path):
    root = make_ade(tmp_path / "ade")
    lbl = root / "ADEChallengeData2016/annotations/training/ADE_000.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(lbl)
    ds = build_dataset(small("danet_r50-d8_ade20k"), root, "train")
    with pytest.raises(DanetError, match=r"ADE_000\.png is a RGB image; expected one class index per pixel"):
        ds[0]
    sixteen = np.full((40, 60), 5, np.uint16)
    cv2.imwrite(str(lbl), sixteen)
    assert int(ds.read(0)[1][0, 0]) == 4  # a 16-bit file with small values is fine (reduce-zero-label: 5 -> 4)
    sixteen[0, 0] = 1000
    cv2.imwrite(str(lbl), sixteen)
    with pytest.raises(DanetError, match=r"ADE_000\.png has values \[1000\]"):
        ds[0]


def test_image_formats_become_rgb_uint8(tmp_path):
    gray = tmp_path / "g.png"
    cv2.imwrite(str(gray), np.full((5, 6), 77, np.uint8))
    rgba = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((5, 6, 3), (10, 20, 30), np.uint8), np.zeros((5, 6), np.uint8)])).save(rgba)
    deep = tmp_path / "d.png"
    cv2.imwrite(str(deep), np.full((5, 6, 3), 256 * 200, np.uint16))
    assert (read_image(gray) == 77).all() and read_image(gray).shape == (5, 6, 3)
    assert read_image(rgba).dtype == np.uint8 and tuple(read_image(rgba)[0, 0]) == (10, 20, 30)  # alpha dropped
    assert (read_image(deep) == 200).all()
    with pytest.raises(DanetError, match=r"image .*missing\.jpg does not exist"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(DanetError, match=r"label .*g\.txt is corrupt"):
        (tmp_path / "g.txt").write_text("hello")
        read_label(tmp_path / "g.txt")


def test_voc_own_splits_read_voc_masks_and_train_names_vocs_own_list(tmp_path):
    """VOC's train.txt is reached as "train" where it exists (the preset trains on trainaug, which "train" names
    where it does not); VOC's own lists read SegmentationClass only: a missing val mask is an error, not the SBD
    mask of the same id (no 255 boundaries, another annotation)."""
    base = tmp_path / "VOC2012"
    ids = ["2007_000032", "2007_000039"]
    for i, name in enumerate(ids):
        write_image(base / "JPEGImages" / f"{name}.jpg", 30, 40, i)
        write_label(base / "SegmentationClassAug" / f"{name}.png", np.full((30, 40), 7))
    write_label(base / "SegmentationClass" / f"{ids[0]}.png", np.full((30, 40), 3), palette=True)
    voc_lists(base, trainaug=ids, train=ids[:1], val=ids[1:])
    preset = small("danet_r50-d8_voc12aug")
    train = build_dataset(preset, tmp_path, "train", train=False)
    assert train.split == "train" and len(train) == 1
    assert build_dataset(preset, tmp_path, "trainaug", train=False)[1][1].unique().tolist() == [7]  # SBD's
    with pytest.raises(DanetError, match=rf"label .*SegmentationClass/{ids[1]}\.png .* does not exist"):
        build_dataset(preset, tmp_path, "val")


def test_hidden_files_beside_ade20k_and_cityscapes_images_are_not_images(tmp_path):
    """macOS's AppleDouble files (`._name`) beside each image of a dataset copied from a Mac."""
    root = make_ade(tmp_path / "ade", {"validation": 2})
    (root / "ADEChallengeData2016/images/validation/._ADE_000.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert len(build_dataset(small("danet_r50-d8_ade20k"), root, "val")) == 2
    city = tmp_path / "cs" / "leftImg8bit" / "val" / "lindau"
    write_image(city / "lindau_000000_000019_leftImg8bit.png", 32, 64)
    (city / "._lindau_000000_000019_leftImg8bit.png").write_bytes(b"\x00\x05\x16\x07")
    write_label(tmp_path / "cs/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png", np.zeros((32, 64)))
    preset = small("danet_r50-d8_cityscapes", base=(128, 64), crop=(32, 64))
    assert len(build_dataset(preset, tmp_path / "cs", "val")) == 1


def test_the_synthetic_preset_on_a_folder_dataset_of_train_val_splits_names_the_option(tmp_path):
    """The synthetic preset reads the folder layout with its own split names (training, validation); given your
    own data of train / val splits it said only 'has neither images/training/ nor a training.txt list'."""
    root = make_folder(tmp_path / "mine")
    (root / "classes.yaml").write_text("[background, disc, square, triangle, stripes]\n")
    with pytest.raises(DanetError, match=r"has neither images/training/ .* add --set data.dataset=folder \(train\)"):
        build_dataset(get_preset("danet_tiny_synthetic"), root, "training")  # what danet train reads
