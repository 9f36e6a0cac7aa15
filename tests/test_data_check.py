"""`danet data check` lists every planted fault (it does not stop at the first) and exits non-zero."""

from __future__ import annotations

import numpy as np
from PIL import Image

from danet.cli import main
from test_data_layouts import make_ade, make_folder, write_label


def test_check_lists_every_fault(tmp_path, capsys):
    root = make_ade(tmp_path / "ade", {"training": 6, "validation": 3})
    ade = root / "ADEChallengeData2016"
    (ade / "images/training/ADE_000.jpg").write_bytes(b"garbage")  # unreadable image
    (ade / "annotations/training/ADE_001.png").unlink()  # missing label
    write_label(ade / "annotations/training/ADE_002.png", np.ones((40, 61)))  # size mismatch
    bad = np.ones((40, 60))
    bad[0, 0] = 200
    write_label(ade / "annotations/validation/ADE_001.png", bad)  # out-of-range value
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(ade / "annotations/validation/ADE_002.png")  # RGB label
    (ade / "annotations/training/ADE_003.png").write_bytes(b"\x89PNG broken")  # corrupt label
    rc = main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "training: 6 images, 2 readable pairs" in out and "validation: 3 images, 1 readable pairs" in out
    assert "6 faults" in out
    faults = [line.strip() for line in out.splitlines() if line.strip().startswith("[")]
    expected = [
        ("[training]", "ADE_000.jpg is corrupt"),
        ("[training]", "ADE_001.png of image ADE_001.jpg does not exist"),
        ("[training]", "ADE_002.png is 61x40 but image"),
        ("[training]", "ADE_003.png is corrupt"),
        ("[validation]", "ADE_001.png has values [200] outside the 150 classes"),
        ("[validation]", "ADE_002.png is a RGB image"),
    ]
    assert len(faults) == len(expected)
    for split, text in expected:
        assert any(f.startswith(split) and text in f for f in faults), (split, text, faults)


def test_check_clean_dataset_and_jobs(tmp_path, capsys):
    root = make_ade(tmp_path / "ade")
    rc = main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress", "--jobs", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "no faults" in out and "training: 3 images, 3 readable pairs" in out


def test_check_missing_split_is_a_fault_not_a_crash(tmp_path, capsys):
    root = make_ade(tmp_path / "ade", {"training": 2})
    rc = main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "[validation]" in out and "images/validation does not exist" in out
    assert "training: 2 images, 2 readable pairs" in out


def test_check_one_split_of_a_folder_dataset(tmp_path, capsys):
    root = make_folder(tmp_path / "mine")
    # the folder reader needs the preset's classes to match the classes file: borrow the synthetic preset's
    (root / "classes.yaml").write_text("[background, disc, square, triangle, stripes]\n")
    (root / "extra.txt").write_text("train/sub/im0\ntrain/sub/im1\n")  # a split given as a list file
    (root / "masks/train/sub/im1.png").unlink()
    rc = main(["data", "check", "danet_tiny_synthetic", "--data-root", str(root), "--split", "extra", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "extra: 2 images, 1 readable pairs" in out and "1 fault (1 missing)" in out
    assert "[extra] label" in out and "im1.png of image im1.png does not exist" in out
    assert "[validation]" not in out and "[training]" not in out


def test_check_reports_every_fault_of_a_pair_each_split_once_and_a_split_with_nothing_labelled(tmp_path, capsys):
    """A label with a bad value that is also the wrong size, and a corrupt image whose label is missing, reported
    one fault each (the others showed up only once the first was fixed); --split val --split validation checked
    the split twice (10 faults for 5); a split whose labels are all ignored passed, though danet test refuses it."""
    root = make_ade(tmp_path / "ade", {"training": 3, "validation": 2})
    ade = root / "ADEChallengeData2016"
    bad = np.ones((37, 60))
    bad[0, 0] = 200
    write_label(ade / "annotations/training/ADE_000.png", bad)  # a bad value and 3 rows short
    (ade / "images/training/ADE_001.jpg").write_bytes(b"garbage")  # corrupt, and its label missing
    (ade / "annotations/training/ADE_001.png").unlink()
    for i in range(2):
        write_label(ade / f"annotations/validation/ADE_00{i}.png", np.zeros((40, 60)))  # 0: ignored (reduce-zero)
    argv = ["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"]
    assert main([*argv, "--split", "train", "--split", "training", "--split", "val", "--split", "validation"]) == 1
    out = capsys.readouterr().out
    assert out.count("training: 3 images") == 1 and out.count("validation: 2 images") == 1
    faults = [line.strip() for line in out.splitlines() if line.strip().startswith("[")]
    assert len(faults) == 5 and "5 faults" in out, faults
    expected = (
        "ADE_000.png has values [200] outside",
        "ADE_000.png is 60x37 but image",
        "ADE_001.jpg is corrupt",
        "ADE_001.png of image ADE_001.jpg does not exist",
        "[validation] no labelled pixel in its 2 readable labels (all ignore 255, or 0 under reduce-zero",
    )
    for text in expected:  # fmt: skip
        assert sum(text in f for f in faults) == 1, (text, faults)


def test_check_reports_a_label_whose_image_is_missing(tmp_path, capsys):
    """The pairs are listed from the images, so a label beside no image (its image lost) was never reported."""
    root = make_ade(tmp_path / "ade", {"training": 2, "validation": 2})
    ade = root / "ADEChallengeData2016"
    (ade / "images/validation/ADE_001.jpg").unlink()
    rc = main(["data", "check", "danet_r50-d8_ade20k", "--data-root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 fault (1 missing)" in out
    assert f"[validation] label {ade / 'annotations/validation/ADE_001.png'} has no image in the split" in out
