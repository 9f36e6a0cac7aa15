"""Faults found by an exploratory review of the data code as a user meets it: split lists with absolute paths, linked
folders, hidden files, two images for one mask, ambiguous classes files (a colour twice, a name twice in a mapping,
a colour missing a value, boolean names), JPEG masks, truncated PNGs, turned (EXIF) images, SBD masks holding values
that are no class, leftovers of a killed `danet data prepare`, a missing data root under `danet data check`, a
folder dataset given to a preset that reads another layout, and a split with no labelled pixel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

import danet
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.data import build_dataset, folder_info
from danet.data.check import CheckReport, format_report
from danet.data.folder import list_files, load_classes
from danet.data.io import read_image, read_label, read_pair, remove_stale_temporaries
from danet.data.prepare import prepare_voc_aug
from danet.data.voc import list_files as voc_list_files
from danet.errors import DanetError
from test_data_layouts import make_ade, make_folder, write_image, write_label
from test_data_prepare import make_voc_and_sbd
from test_faults_common import cli_error, tiny_folder_dataset, tiny_model

PRESET = "danet_tiny_synthetic"


def names(pairs) -> list[str]:
    return [image.name for image, _ in pairs]


# ------------------------------------------------------------------------------------------------- folder layout
def test_a_split_list_with_an_absolute_path_is_one_line(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "extra.txt").write_text(f"train/sub/im0.png\n{root / 'images/train/sub/im1.png'}\n")
    with pytest.raises(DanetError, match=r"extra.txt line 2 is an absolute path .* relative to .*images"):
        list_files(root, "extra")


def test_linked_folders_are_read_once_and_hidden_files_skipped(tmp_path):
    root = make_folder(tmp_path / "mine")
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "img" / "l0.png", 24, 32)
    write_label(elsewhere / "msk" / "l0.png", np.zeros((24, 32)))
    os.symlink(elsewhere / "img", root / "images/train/linked")
    os.symlink(elsewhere / "msk", root / "masks/train/linked")
    os.symlink(root / "images/train", root / "images/train/sub/loop")  # a link back up the tree
    os.symlink(root / "images/train/sub", root / "images/train/a_link")  # listed before sub: read as sub all the same
    write_image(root / "images/train/sub/._im0.png", 24, 32)  # what macOS leaves on other disks
    pairs = list_files(root, "train")
    assert names(pairs) == ["l0.png", "im0.png", "im1.png", "im2.png"]
    assert pairs[0][1] == root / "masks/train/linked/l0.png"
    assert folder_info(root).num_train == 4


def test_two_images_for_one_mask_are_refused(tmp_path):
    root = make_folder(tmp_path / "mine")
    write_image(root / "images/train/sub/im0.jpg", 24, 32)
    with pytest.raises(DanetError, match=r"im0.jpg and im0.png would share the mask .*im0.png; rename or remove"):
        list_files(root, "train")


def test_a_jpeg_beside_a_missing_png_mask_is_named(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    root = tiny_folder_dataset(tmp_path / "data")
    mask = root / "masks/validation/a.png"
    Image.open(mask).convert("L").save(mask.with_suffix(".jpg"))
    mask.unlink()
    with pytest.raises(DanetError, match=r"a.png of image a.png does not exist \(there is a.jpg: masks must be PNG"):
        build_dataset(danet.get_preset(PRESET), root, "val")


# ------------------------------------------------------------------------------------------------- classes files
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bg: [0, 0, 0]\nbg: [255, 0, 0]\ndog: [0, 255, 0]\n", r"'bg' is named twice, at line 1, column 1 and line 2"),
        ("- bg\n- cat\n- cat\n- dog\n- dog\n", r"names \['cat', 'dog'\] more than once"),
        ("- bg\n- ''\n", r"class 1 has no usable name"),
        ("- bg\n- no\n", r"class 1 is the boolean False; write its name in quotes"),
        ("classes:\n  - {name: bg, color: [0,0,0]\n  - {name: cat}\n", r"malformed \(not valid YAML at line 3, column"),
    ],
    ids=["mapping key twice", "name twice", "empty name", "boolean", "unclosed brace"],
)  # fmt: skip
def test_ambiguous_yaml_classes_files_are_one_line(tmp_path, text, match):
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(DanetError, match=match) as e:
        load_classes(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("line", "match"),
    [("cat 255 0", "a colour is three integers R G B"), ("cat #ff00zz", r"#ff00zz is not #rrggbb"),
     ("cat 300 0 0", r"\[300, 0, 0\]"), ("cat 1000 0 0", r"\[1000, 0, 0\]")],
)  # fmt: skip
def test_a_malformed_colour_in_classes_txt_is_refused(tmp_path, line, match):
    (tmp_path / "classes.txt").write_text(f"bg 0 0 0\n{line}\ndog 0 255 0\n")
    with pytest.raises(DanetError, match=match):
        load_classes(tmp_path)


def test_classes_txt_names_with_numbers_and_generated_colours_apart_from_given_ones(tmp_path):
    (tmp_path / "classes.txt").write_text("lane 2\nclass 1 255 0 0\nbg #000000\nsky\n")
    names_, palette = load_classes(tmp_path)
    assert names_ == ("lane 2", "class 1", "bg", "sky")
    # lane 2 (class 0) would take VOC colour 0, which bg was given: the first VOC colour no class has (1); sky its 3
    assert palette == ((128, 0, 0), (255, 0, 0), (0, 0, 0), (128, 128, 0))
    (tmp_path / "classes.txt").write_text("bg 0 0 0\ncrack 255 0 0\nhole\nrust\nlane #2\nroute 66\n")
    names_, palette = load_classes(tmp_path)  # without a clash: VOC colour k for class k, as before
    assert names_[4:] == ("lane #2", "route 66") and palette[2:4] == ((0, 128, 0), (128, 128, 0))


def test_yaml_merge_keys_are_no_names_twice(tmp_path):
    (tmp_path / "classes.yaml").write_text(
        "base: &b {color: [1, 2, 3]}\nclasses:\n  - {<<: *b, name: crack}\n  - {name: bg, color: [0, 0, 0]}\n"
    )
    assert load_classes(tmp_path) == (("crack", "bg"), ((1, 2, 3), (0, 0, 0)))


def test_one_colour_for_two_classes_is_refused_in_rgb_masks_only(tmp_path):
    root = make_folder(tmp_path / "rgb", rgb_masks=True)
    (root / "classes.yaml").write_text("bg: [0, 0, 0]\ncat: [255, 0, 0]\ndog: [255, 0, 0]\n")
    preset = danet.get_preset("danet_r50-d8_ade20k").replace(dataset=folder_info(root))
    with pytest.raises(DanetError, match=r"RGB mask, but classes 1 and 2 .* same colour \[255, 0, 0\]"):
        build_dataset(preset, root, "val", train=False)[0]
    index = make_folder(tmp_path / "index")  # masks of class indices: the colours only draw the pictures
    (index / "classes.yaml").write_text("bg: [0, 0, 0]\ncat: [255, 0, 0]\ndog: [255, 0, 0]\n")
    preset = preset.replace(dataset=folder_info(index))
    assert build_dataset(preset, index, "val", train=False)[0][1].max() <= 2


# ------------------------------------------------------------------------------------------------ masks, images
def test_a_mask_holding_jpeg_data_is_refused_and_listed_as_a_format_fault(tmp_path, capsys):
    root = make_ade(tmp_path / "ade", {"training": 1, "validation": 1})
    mask = root / "ADEChallengeData2016/annotations/training/ADE_000.png"
    Image.fromarray(np.full((40, 60), 20, np.uint8)).save(mask, format="JPEG")  # named .png, holding JPEG
    capsys.readouterr()
    rc = main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 fault (1 bad label format)" in out
    assert "holds JPEG data, not PNG; save the masks as PNG files (JPEG's lossy compression" in out


def test_a_truncated_png_image_is_one_line_and_libpng_stays_quiet(tmp_path, capfd):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])
    with pytest.raises(DanetError, match="is truncated"):
        read_image(path)
    assert "libpng" not in capfd.readouterr().err
    tail = tmp_path / "tail.png"  # bytes after the end marker are no truncation
    tail.write_bytes(data + b"\0" * 5000)
    assert read_image(tail).shape == (80, 90, 3)


def test_a_size_mismatch_from_an_exif_turn_says_so(tmp_path):
    image, label = tmp_path / "turned.jpg", tmp_path / "turned.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32 wide x 24 high, shown turned: 24 wide x 32 high
    Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(image, exif=exif)
    write_label(label, np.zeros((24, 32)))
    lut = np.arange(256, dtype=np.int16)
    with pytest.raises(DanetError, match=r"24x32 .* EXIF orientation tag \(6\) turns it when read"):
        read_pair(image, label, lut, 5)
    Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(image)  # upright, no tag: no such hint
    write_label(label, np.zeros((20, 32)))
    with pytest.raises(DanetError) as e:
        read_pair(image, label, lut, 5)
    assert "EXIF" not in str(e.value)


def test_fault_kinds_of_data_check():
    faults = [
        "[val] label x.png has colours [(9, 9, 9)] that are not in the classes file; add them or fix the mask",
        "[val] label y.png is a RGB image; expected one class index per pixel (8-bit grayscale or palette PNG)",
        "[val] no images",
        "[val] image z.png is truncated (its PNG data stop before the end); re-download or remove it",
        "[val] classes file c.yaml is malformed (x)",
    ]
    out = format_report(CheckReport(Path("r"), faults=faults), danet.get_preset(PRESET).dataset)
    assert "5 faults (2 bad label format, 1 missing, 1 unreadable, 1 bad classes file)" in out


# -------------------------------------------------------------------------------------------------------- roots
def test_data_check_of_a_missing_root_or_a_file_is_one_line(tmp_path, capsys):
    line = cli_error(capsys, "data", "check", "danet_r50-d8_ade20k", "--data-root", tmp_path / "nowhere")
    assert "ADE20K data root" in line and "does not exist" in line
    (tmp_path / "file").write_text("x")
    line = cli_error(capsys, "data", "check", "danet_r50-d8_ade20k", "--data-root", tmp_path / "file")
    assert "is a file, not a folder" in line
    line = cli_error(capsys, "data", "check", PRESET, "--dataset", "folder", "--data-root", tmp_path / "file")
    assert "is not a folder" in line


def test_a_folder_dataset_given_to_a_preset_of_another_layout_names_the_option(tmp_path, capsys):
    root = make_folder(tmp_path / "mine")
    capsys.readouterr()
    assert main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "has a classes.yaml" in out and "--dataset folder" in out and "data.dataset=folder" in out


def test_danet_test_on_labels_without_a_labelled_pixel_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    root = tiny_folder_dataset(tmp_path / "data")
    write_label(root / "masks/validation/a.png", np.full((48, 64), 255))
    ck = tmp_path / "m.pth"
    save_checkpoint(ck, tiny_model(), PRESET)
    out = tmp_path / "m.json"
    line = cli_error(capsys, "test", PRESET, "--checkpoint", ck, "--data-root", root, "--no-progress", "--json", out)
    assert "the label of split 'validation' has no labelled pixel (all ignore 255), so mIoU is undefined" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- preparation
def write_raw_sbd_mat(path: Path, mask: np.ndarray) -> None:
    savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros((1, 20)), "CategoriesPresent": []}})


@pytest.mark.parametrize(
    ("mask", "shown"),
    [(np.full((20, 30), -1, np.int16), "[-1]"), (np.full((20, 30), 77, np.uint8), "[77]"),
     (np.full((20, 30), 2.7), "[2.7]")],
    ids=["negative", "no class", "fraction"],
)  # fmt: skip
def test_sbd_masks_holding_values_that_are_no_class_are_refused(tmp_path, capsys, mask, shown):
    voc, sbd = make_voc_and_sbd(tmp_path)
    write_raw_sbd_mat(sbd / "dataset/cls/s2.mat", mask)
    line = cli_error(capsys, "data", "prepare", "voc-aug", "--voc", voc, "--sbd", sbd, "--no-progress")
    assert f"s2.mat holds values {shown} that are not VOC class indices" in line
    assert (voc / "VOC2012/SegmentationClassAug/a2.png").is_file()  # what came before it is kept


def test_prepare_removes_what_a_killed_run_left(tmp_path):
    voc, sbd = make_voc_and_sbd(tmp_path)
    out = voc / "VOC2012/SegmentationClassAug"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = out / f".s1.tmp{int(dead.stdout)}.png", out / f".s2.tmp{os.getppid()}.png"
    recent = out / f".s3.tmp{int(dead.stdout)}.png"  # no local writer, but fresh: another machine's, on a shared disk
    for f in (stale, live, recent):
        f.write_bytes(b"\x89PNG half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    prepare_voc_aug(voc, sbd, progress=False)
    assert not stale.exists() and live.exists() and recent.exists()  # a running or recent writer's file stays
    assert remove_stale_temporaries([out]) == 0


def test_voc_ids_are_whole_lines(tmp_path):
    voc, _ = make_voc_and_sbd(tmp_path)
    base = voc / "VOC2012"
    write_image(base / "JPEGImages/my image.jpg", 20, 30)
    (base / "ImageSets/Segmentation/val.txt").write_text("v1\nmy image\n")
    assert [p.name for p, _ in voc_list_files(voc, "val")] == ["v1.jpg", "my image.jpg"]


def test_a_float_tiff_image_is_named_for_what_it_is(tmp_path, capfd):
    """A 32-bit float TIFF: one line saying so (it was called corrupt, and OpenCV printed a warning line of its own)."""
    import cv2

    from danet.data.io import read_image

    path = tmp_path / "depth.tif"
    assert cv2.imwrite(str(path), np.random.default_rng(0).random((8, 9, 3), dtype=np.float32))
    capfd.readouterr()
    with pytest.raises(DanetError, match="holds floating-point samples \\(float32\\).*save it as an 8-bit PNG"):
        read_image(path)
    assert capfd.readouterr().err == ""
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DanetError, match="is corrupt or not an image format OpenCV can decode"):
        read_image(tmp_path / "bad.png")


def test_an_image_or_label_too_large_to_decode_is_called_so_not_corrupt(tmp_path):
    """A valid image past OpenCV's 2^30 pixels was called 'corrupt ...; replace or remove it', and a label past
    Pillow's decompression-bomb limit 'corrupt or not an image (...)': both now say their size and the limit."""
    import struct
    import zlib

    def header_only_png(path: Path, w: int, h: int) -> Path:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99))
                         + chunk(b"IEND", b""))  # fmt: skip
        return path

    with pytest.raises(DanetError, match=r"has 1,600,000,000 pixels, more than OpenCV decodes \(1,073,741,824\)"):
        read_image(header_only_png(tmp_path / "big.png", 40000, 40000))
    with pytest.raises(DanetError, match=r"has 196,000,000 pixels, more than Pillow opens .*decompression-bomb"):
        read_label(header_only_png(tmp_path / "mask.png", 14000, 14000))
    with pytest.raises(DanetError, match="is corrupt"):  # a small image with the same broken data is corrupt
        read_image(header_only_png(tmp_path / "small.png", 64, 64))
