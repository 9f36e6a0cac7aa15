"""`danet data prepare voc-aug` on a tiny fake SBD and `danet data prepare cityscapes` (labelIds -> trainIds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from danet.cli import main
from danet.data import build_dataset
from danet.data.cityscapes import LABELID_TO_TRAINID, trainid_lut
from danet.presets import get_preset
from test_data_layouts import write_image, write_label


def write_sbd_mat(path: Path, mask: np.ndarray) -> None:
    """An SBD cls/*.mat file: struct GTcls with Segmentation, Boundaries and CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
    savemat(
        path,
        {"GTcls": {"Segmentation": mask.astype(np.uint8), "Boundaries": np.zeros((1, 20)), "CategoriesPresent": cats}},
    )


def make_voc_and_sbd(tmp: Path) -> tuple[Path, Path]:
    voc = tmp / "VOCdevkit"
    base = voc / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a1\na2\n")
    (sets / "val.txt").write_text("v1\nv2\n")
    for i in ("a1", "a2", "v1", "v2", "s1", "s2", "s3"):
        write_image(base / "JPEGImages" / f"{i}.jpg", 20, 30)
    for i in ("a1", "a2", "v1", "v2"):
        write_label(base / "SegmentationClass" / f"{i}.png", np.full((20, 30), 5), palette=True)
    sbd = tmp / "benchmark_RELEASE"
    (sbd / "dataset").mkdir(parents=True)
    (sbd / "dataset" / "train.txt").write_text("s1\na2\nv1\n")  # SBD overlaps VOC train and val
    (sbd / "dataset" / "val.txt").write_text("s2\ns3\n")
    for k, i in enumerate(("s1", "a2", "v1", "s2", "s3")):
        write_sbd_mat(sbd / "dataset" / "cls" / f"{i}.mat", np.full((20, 30), k + 1))
    return voc, sbd


def test_prepare_voc_aug(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    assert main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress"]) == 0
    base = voc / "VOC2012"
    assert (base / "ImageSets/Segmentation/trainaug.txt").read_text().split() == ["a1", "a2", "s1", "s2", "s3"]
    png = base / "SegmentationClassAug" / "s2.png"
    assert np.asarray(Image.open(png)).tolist() == np.full((20, 30), 4).tolist()
    assert sorted(p.name for p in (base / "SegmentationClassAug").iterdir()) == [
        f"{i}.png" for i in ("a2", "s1", "s2", "s3", "v1")
    ]
    assert "5 written" not in capsys.readouterr().out  # 5 masks + the list
    ds = build_dataset(get_preset("danet_r50-d8_voc12aug"), voc, "trainaug", train=False)
    assert len(ds) == 5
    assert int(ds[1][1][0, 0]) == 5  # a2: the official VOC mask wins over SBD's
    assert int(ds[2][1][0, 0]) == 1  # s1: from SBD
    # a second run keeps what is there; --overwrite redoes it
    png.write_bytes(b"edited")
    main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress"])
    assert png.read_bytes() == b"edited" and "0 written, 6 kept" in capsys.readouterr().out
    main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress", "--overwrite"])
    assert png.read_bytes() != b"edited" and not list((base / "SegmentationClassAug").glob(".*"))  # no temp files


def test_prepare_voc_aug_errors(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    (sbd / "dataset" / "cls" / "s3.mat").write_bytes(b"not a mat file")
    assert main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress"]) == 2
    assert "s3.mat is unreadable" in capsys.readouterr().err
    assert main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(tmp_path / "no")]) == 2
    assert "no SBD dataset/cls folder" in capsys.readouterr().err


def test_prepare_cityscapes(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every labelId value once
    for split in ("train", "val"):
        write_image(root / "leftImg8bit" / split / "bonn" / "bonn_000000_000019_leftImg8bit.png", 16, 16)
        write_label(root / "gtFine" / split / "bonn" / "bonn_000000_000019_gtFine_labelIds.png", ids)
    assert main(["data", "prepare", "cityscapes", str(root), "--no-progress"]) == 0
    assert "2 written" in capsys.readouterr().out
    out = np.asarray(Image.open(root / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelTrainIds.png"))
    expect = np.full(256, 255)
    for label_id, train_id in LABELID_TO_TRAINID.items():
        expect[label_id] = train_id
    assert out.ravel().tolist() == expect.tolist()
    assert out[0, 7] == 0 and out[1, 1] == 5 and out[2, 1] == 18 and out[0, 9] == 255  # road, pole, bicycle, parking
    assert (trainid_lut() == expect).all()
    assert sorted(set(expect.tolist()) - {255}) == list(range(19))
    ds = build_dataset(get_preset("danet_r50-d8_cityscapes"), root, "val")
    assert ds[0][1].shape == (16, 16)
    assert main(["data", "prepare", "cityscapes", str(root), "--no-progress"]) == 0
    assert "0 written, 2 kept" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["cityscapes", "{tmp}/none"], ["cityscapes", "{tmp}"]])
def test_prepare_cityscapes_errors(tmp_path, capsys, args):
    assert main(["data", "prepare", *[a.format(tmp=tmp_path) for a in args]]) == 2
    assert "gtFine" in capsys.readouterr().err


def test_training_a_voc_preset_reads_trainaug_where_voc_s_own_train_list_is_there_too(tmp_path, monkeypatch):
    """Every VOC 2012 has ImageSets/Segmentation/train.txt (1,464 ids) beside the trainaug.txt prepared from SBD:
    `danet train` reads trainaug with the training pipeline (it read train.txt through the evaluation pipeline,
    whose labels keep their own size, and crashed in the loss), and `build_dataset(..., "train")` gives training
    crops of whatever split "train" names."""
    voc, sbd = make_voc_and_sbd(tmp_path)
    main(["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress"])
    preset = get_preset("danet_r50-d8_voc12aug")
    ds = build_dataset(preset, voc, "train")
    assert (ds.split, ds.train, len(ds)) == ("train", True, 2)  # VOC's own list, as --split train names it
    monkeypatch.setenv("DANET_CACHE", str(tmp_path / "cache"))
    tiny = ["backbone_weights=none", "data.crop_size=[32,32]", "data.base_size=[48,32]", "schedule.batch_size=2",
            "schedule.loss_images=0", "model.depth=26", "model.base_channels=8", "model.stem_channels=8",
            "model.head_channels=16", "schedule.epochs=1", "data.num_workers=0", "progress=false"]  # fmt: skip
    work = tmp_path / "run"
    sets = [a for s in tiny for a in ("--set", s)]
    assert main(["train", preset.name, "--data-root", str(voc), "--work-dir", str(work), *sets]) == 0
    start = next(r for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if r["type"] == "start")
    assert start["iters_per_epoch"] == 2  # trainaug's 5 ids in batches of 2 (train.txt's 2 would make 1)


def test_prepare_voc_aug_refuses_incomplete_sbd_before_writing_anything(tmp_path, capsys):
    """An id of the lists with no mask anywhere (a .mat missing) or an empty SBD list: one line, exit 1, nothing
    written (it wrote every mask and a trainaug.txt naming the id, with a warning, and exited 0: training then failed
    on the missing label)."""
    voc, sbd = make_voc_and_sbd(tmp_path)
    argv = ["data", "prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress"]
    (sbd / "dataset" / "cls" / "s3.mat").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("1 of the 5 trainaug ids have neither a SegmentationClass PNG nor an SBD cls/*.mat mask "
                        "(first: s3); extract VOC2012 and SBD's benchmark.tgz again")  # fmt: skip
    base = voc / "VOC2012"
    assert not (base / "SegmentationClassAug").exists() and not (base / "ImageSets/Segmentation/trainaug.txt").exists()
    write_sbd_mat(sbd / "dataset" / "cls" / "s3.mat", np.full((20, 30), 2))
    (sbd / "dataset" / "val.txt").write_text("\n")
    assert (
        main(argv) == 2 and "SBD val list" in capsys.readouterr().err and not (base / "SegmentationClassAug").exists()
    )
