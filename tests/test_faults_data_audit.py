"""Fault injection found by an audit of the data code: malformed classes-file colours and names, split lists that are
not UTF-8, a full disk under `danet data prepare`, the class-list mismatch message, and keep-ratio sizes of extreme
aspect ratios. Each bad input gives one line (exit 2, no traceback; `danet data check` lists it as a fault, exit 1)
and leaves what was written before with its bytes.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import danet
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.data.folder import load_classes
from danet.data.transforms import EvalPipeline, TrainPipeline, keep_ratio_size, resize_keep_ratio
from danet.data.voc import list_files as voc_list_files
from danet.errors import DanetError
from test_data_layouts import write_image, write_label
from test_data_prepare import make_voc_and_sbd
from test_faults_common import cli_error, digest, tiny_model

PRESET = "danet_tiny_synthetic"
CLASSES = list(danet.get_preset(PRESET).classes)
H, W = 24, 32
FAST = [
    "--set", "schedule.epochs=1", "--set", "schedule.iters_per_epoch=1", "--set", "schedule.batch_size=2",
    "--set", "data.crop_size=[16,16]", "--set", "data.val_limit=1", "--set", "progress=false", "--set", "device=cpu",
]  # fmt: skip


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A folder dataset with the synthetic preset's classes: 2 training + 1 validation images."""
    root = tmp_path / "data"
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            write_image(root / "images" / split / f"{i:03d}.png", H, W, i)
            write_label(root / "masks" / split / f"{i:03d}.png", np.random.default_rng(i).integers(0, 5, (H, W)))
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    return root


def check(capsys, root: Path, *extra: str) -> str:
    """`danet data check` of `root`: assert exit 1 and no traceback; return stdout."""
    capsys.readouterr()
    rc = main(["data", "check", PRESET, "--data-root", str(root), "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "Traceback" not in out + err
    return out


# ------------------------------------------------------------------------------------------ classes-file colours
BAD_COLOURS = {
    "word": ("red", "'red'"),
    "number": ("5", "got 5"),
    "digits as text": ("'123'", "'123'"),  # read as the characters 1, 2, 3 before
    "two values": ("[1, 2]", "[1, 2]"),
    "out of range": ("[300, 0, 0]", "[300, 0, 0]"),
    "mapping": ("{r: 1, g: 2, b: 3}", "'r'"),
    "floats": ("[0.5, 1, 2]", "0.5"),
}


def _classes_with_colour(colour: str) -> str:
    rows = [f"  - {{name: {CLASSES[0]}, color: {colour}}}"] + [f"  - {{name: {n}}}" for n in CLASSES[1:]]
    return "classes:\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize("case", list(BAD_COLOURS))
def test_bad_classes_colour_is_one_line(case, folder, capsys):
    colour, shown = BAD_COLOURS[case]
    (folder / "classes.yaml").write_text(_classes_with_colour(colour))
    with pytest.raises(DanetError, match=r"classes\.yaml: colour of 'background' must be three integers 0\.\.255"):
        load_classes(folder)
    out = check(capsys, folder)
    assert "classes.yaml" in out and "'background'" in out and shown in out


def test_bad_classes_colour_stops_train_with_one_line(folder, tmp_path, capsys):
    (folder / "classes.yaml").write_text(_classes_with_colour("red"))
    line = cli_error(capsys, "train", PRESET, "--data-root", folder, "--work-dir", tmp_path / "w", *FAST)
    assert "classes.yaml" in line and "'background'" in line and "three integers 0..255" in line


def test_good_classes_colours_still_read(folder):
    (folder / "classes.yaml").write_text(_classes_with_colour("[1, 2, 3]"))
    names, palette = load_classes(folder)
    assert names == tuple(CLASSES) and palette[0] == (1, 2, 3)
    (folder / "classes.yaml").unlink()
    (folder / "classes.txt").write_text("background 1,2,3\ndisc #0a0b0c\nsquare\ntriangle\nstripes 0 0 0\n")
    assert load_classes(folder)[1][:2] == ((1, 2, 3), (10, 11, 12))


def test_class_without_a_plain_name(folder, capsys):
    (folder / "classes.yaml").write_text("classes:\n  - [a, b]\n  - disc\n")
    with pytest.raises(DanetError, match=r"classes\.yaml: class 0 has no usable name"):
        load_classes(folder)
    assert "class 0 has no usable name" in check(capsys, folder)


# ------------------------------------------------------------------------------------- split lists not UTF-8
def _list_split(root: Path, data: bytes) -> None:
    """Replace images|masks/validation by a validation.txt list (its bytes: `data`) of training images."""
    shutil.rmtree(root / "images" / "validation")
    shutil.rmtree(root / "masks" / "validation")
    (root / "validation.txt").write_bytes(data)


def test_split_list_not_utf8_is_one_line(folder, tmp_path, capsys):
    _list_split(folder, "training/000\ntraining/001\n".encode("utf-16"))  # a BOM 0xff 0xfe, then UTF-16
    out = check(capsys, folder, "--split", "validation")
    assert "validation.txt is not UTF-8 text" in out
    ck = tmp_path / "m.pth"
    save_checkpoint(ck, tiny_model(), PRESET)
    line = cli_error(capsys, "test", PRESET, "--checkpoint", ck, "--data-root", folder, "--no-progress")
    assert "validation.txt is not UTF-8 text" in line


def test_split_list_with_utf8_bom_is_read(folder):
    """A UTF-8 list saved with a byte order mark (Windows Notepad): its first name is not taken as '\\ufefftr...'."""
    _list_split(folder, "training/000\ntraining/001\n".encode("utf-8-sig"))
    ds = danet.data.build_dataset(danet.get_preset(PRESET), folder, "val")
    assert [p.name for p, _ in ds.files] == ["000.png", "001.png"] and all(p.is_file() for p, _ in ds.files)


def test_voc_split_list_not_utf8(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    (voc / "VOC2012/ImageSets/Segmentation/val.txt").write_bytes(b"v1\n\xe9t\xe9\n")  # Latin-1
    with pytest.raises(DanetError, match=r"split list .*val\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        voc_list_files(voc, "val")
    line = cli_error(capsys, "data", "prepare", "voc-aug", "--voc", voc, "--sbd", sbd, "--no-progress")
    assert "VOC2012/ImageSets/Segmentation/val.txt is not UTF-8 text" in line


# ---------------------------------------------------------------------------------------- prepare on a full disk
def _full_disk(path, nbytes: int):
    """Put `nbytes` into `path`, then fail as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"[:nbytes])
    raise OSError(errno.ENOSPC, "No space left on device")


def _image_save_on_full_disk(nbytes: int):
    """A stand-in for `PIL.Image.Image.save(fp, ...)`."""
    return lambda image, fp, *args, **kwargs: _full_disk(fp, nbytes)


def _path_write_on_full_disk(nbytes: int):
    """A stand-in for `Path.write_bytes(data)` / `Path.write_text(text)`."""
    return lambda path, data, *args, **kwargs: _full_disk(path, nbytes)


def _cityscapes(root: Path) -> list[Path]:
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    outs = []
    for split in ("train", "val"):
        write_image(root / "leftImg8bit" / split / "bonn" / "bonn_000000_000019_leftImg8bit.png", 16, 16)
        write_label(root / "gtFine" / split / "bonn" / "bonn_000000_000019_gtFine_labelIds.png", ids)
        outs.append(root / "gtFine" / split / "bonn" / "bonn_000000_000019_gtFine_labelTrainIds.png")
    return outs


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


def test_prepare_cityscapes_disk_full_is_one_line_and_keeps_outputs(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cityscapes"
    train_out, val_out = _cityscapes(root)
    # nothing there yet: the failed file is not left half-written
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", _image_save_on_full_disk(5))
        line = cli_error(capsys, "data", "prepare", "cityscapes", root, "--no-progress")
    assert train_out.name in line and "No space left on device" in line and "free some space" in line
    assert not train_out.exists() and not val_out.exists() and not _hidden(root)
    # outputs from an earlier run keep their bytes when --overwrite meets a full disk
    assert main(["data", "prepare", "cityscapes", str(root), "--no-progress"]) == 0
    before = {p: digest(p) for p in (train_out, val_out)}
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", _image_save_on_full_disk(8))
        line = cli_error(capsys, "data", "prepare", "cityscapes", root, "--no-progress", "--overwrite")
    assert train_out.name in line and "No space left on device" in line
    assert {p: digest(p) for p in before} == before and not _hidden(root)


def test_prepare_voc_aug_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    voc, sbd = make_voc_and_sbd(tmp_path)
    aug = voc / "VOC2012/SegmentationClassAug"
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", _image_save_on_full_disk(4))
        line = cli_error(capsys, "data", "prepare", "voc-aug", "--voc", voc, "--sbd", sbd, "--no-progress")
    assert "SegmentationClassAug/a2.png" in line and "No space left on device" in line
    assert not list(aug.iterdir())
    # the masks fit, the list does not
    trainaug = voc / "VOC2012/ImageSets/Segmentation/trainaug.txt"
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", _path_write_on_full_disk(3))
        m.setattr(Path, "write_text", _path_write_on_full_disk(3))
        line = cli_error(capsys, "data", "prepare", "voc-aug", "--voc", voc, "--sbd", sbd, "--no-progress")
    assert "trainaug.txt" in line and "No space left on device" in line
    assert not trainaug.exists() and len(list(aug.glob("*.png"))) == 5 and not _hidden(voc)


# ---------------------------------------------------------------------------------- a folder's own class list
def test_other_classes_message_says_what_a_command_line_user_can_do(folder, tmp_path, capsys):
    (folder / "classes.yaml").write_text("[sky, road]\n")
    line = cli_error(capsys, "train", PRESET, "--data-root", folder, "--work-dir", tmp_path / "w", *FAST)
    assert "names 2 classes" in line and "--set data.dataset=folder (train)" in line and "--dataset folder" in line
    assert "list the preset's 5 classes in the file, in order" in line
    assert "in order" in check(capsys, folder)


# ------------------------------------------------------------------------------------ extreme aspect ratios
def test_keep_ratio_size_keeps_one_pixel():
    assert keep_ratio_size(2, 1000, (192, 192)) == (192, 1)  # int(2 * 0.192 + 0.5) = 0 before
    assert keep_ratio_size(1000, 2, (64, 64)) == (1, 64)  # int(2 * 0.064 + 0.5) = 0 before
    assert keep_ratio_size(100, 3000, (2048, 512)) == (2048, 68)  # unchanged elsewhere
    assert keep_ratio_size(300, 200, (512, 2048)) == (512, 768)


def test_pipelines_on_a_2x1000_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 1000, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (2, 1000)).astype(np.uint8)
    small, lab = resize_keep_ratio(image, label, (192, 192))
    assert small.shape == (1, 192, 3) and lab.shape == (1, 192)
    assert EvalPipeline(base_size=(192, 192))(image).shape == (3, 1, 192)
    img, lab = TrainPipeline(base_size=(192, 192), crop_size=(16, 16))(image, label, np.random.default_rng(1))
    assert img.shape == (3, 16, 16) and lab.shape == (16, 16)
