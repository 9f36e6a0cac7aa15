"""Fault injection: `danet predict`, `danet convert` and `danet zoo download` with outputs that would destroy inputs,
a full disk, and bad option values. Each fault gives one line on stderr, exit status 2, no traceback, and leaves the
files already there (input images, earlier outputs, a run's checkpoint) with their bytes.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet.checkpoints import read_checkpoint, save_checkpoint
from danet.cli import main
from test_faults_common import cli_error, digest, tiny_model

PRESET = "danet_tiny_synthetic"


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of two small photos."""
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(root / name)
    return root


def digests(root: Path) -> dict[str, str]:
    """Every file below `root` (hidden ones too: a temp file left behind shows) and its digest."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- predict: outputs vs inputs
@pytest.mark.parametrize("case", ["file-into-its-folder", "dot-into-dot", "overlay-onto-input"])
def test_predict_refuses_to_overwrite_an_input(case, photos, checkpoint, monkeypatch, capsys):
    if case == "overlay-onto-input":  # a.png -> a.png is refused too; here only the overlay of b.jpg hits an input
        (photos / "a.png").unlink()
        Image.open(photos / "b.jpg").save(photos / "b_overlay.jpg")
    before = digests(photos)
    argv = {
        "file-into-its-folder": [photos / "a.png", "--out", photos],
        "dot-into-dot": [".", "--out", "."],
        "overlay-onto-input": [photos, "--out", photos, "--overlay"],
    }[case]
    monkeypatch.chdir(photos)
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, *argv)
    assert "would overwrite the input image" in line and "another --out" in line
    assert digests(photos) == before  # refused before writing anything


def test_predict_into_a_subfolder_twice_skips_its_own_outputs(photos, checkpoint, capsys):
    out = photos / "preds"
    argv = ["predict", "--checkpoint", str(checkpoint), str(photos), "--out", str(out), "--overlay"]
    assert main(argv) == 0
    first = digests(out)
    assert sorted(first) == ["a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg", "legend.png"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "wrote 2 label map(s)" in capsys.readouterr().out
    assert sorted(digests(out)) == sorted(first)  # no preds/preds/..., no a_overlay.png


# -------------------------------------------------------------------------------------------- predict: a full disk
def _fail_after_half(monkeypatch) -> None:
    """PIL's save writes a few bytes and then hits a full disk."""

    def save(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG partial")
        else:
            Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)


def _error_line(capsys, argv) -> str:
    """Exit 2 and no traceback; the error is the last line (the progress bar may precede it)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("overlay", [False, True])
def test_predict_on_a_full_disk_keeps_earlier_outputs(overlay, photos, checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", checkpoint, photos / "a.png", "--out", out, *(["--overlay"] if overlay else [])]
    assert main([str(a) for a in argv]) == 0
    before = digests(out)
    _fail_after_half(monkeypatch)
    line = _error_line(capsys, argv)
    assert line.startswith("danet predict: error: cannot write ") and "a.png" in line
    assert "No space left on device" in line and "--out" in line
    assert digests(out) == before  # the previous label map kept its bytes; no temp file left


def test_predict_on_a_full_disk_leaves_no_partial_file(photos, checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _fail_after_half(monkeypatch)
    line = _error_line(capsys, ["predict", "--checkpoint", checkpoint, photos / "a.png", "--out", out])
    assert "cannot write" in line and "No space left on device" in line
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------- predict: bad input
def test_predict_an_extreme_aspect_ratio(checkpoint, tmp_path):
    """A 2 x 1000 image: keep-ratio resizing to the base size must not round a side to 0 pixels."""
    image = tmp_path / "thin.png"
    Image.fromarray(np.full((2, 1000, 3), 128, np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "thin.png").size == (1000, 2)


@pytest.mark.parametrize("alpha", ["5", "-1", "nan"])
def test_predict_alpha_outside_0_1(alpha, photos, checkpoint, tmp_path, capsys):
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, photos, "--out", tmp_path / "out", "--alpha", alpha)
    assert "--alpha" in line and "0..1" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["foo", "cuda"])
def test_predict_bad_device_names_its_own_option(device, photos, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(
        capsys, "predict", "--checkpoint", checkpoint, photos, "--out", tmp_path / "out", "--device", device
    )
    assert ("--device cpu" in line) if device == "cuda" else ("unknown device 'foo'; use auto, cpu, cuda" in line)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- convert in place
@pytest.mark.parametrize("how", ["same", "dot-path", "symlink", "hardlink"])
def test_convert_onto_its_source_is_refused(how, tmp_path, monkeypatch, capsys):
    run = tmp_path / "w"
    run.mkdir()
    src = run / "last.pth"
    save_checkpoint(src, tiny_model(), PRESET, train_state={"iter": 10})
    before = digest(src)
    monkeypatch.chdir(tmp_path)
    dst = {"same": src, "dot-path": "./w/../w/last.pth", "symlink": run / "link.pth", "hardlink": run / "hard.pth"}[how]
    if how == "symlink":
        os.symlink(src, dst)
    elif how == "hardlink":
        os.link(src, dst)
    line = cli_error(capsys, "convert", src, dst)
    assert "is the source checkpoint" in line and "another destination" in line
    assert digest(src) == before and read_checkpoint(src).train_state == {"iter": 10}


# ------------------------------------------------------------------------------------------------ zoo download
def test_zoo_download_not_a_url(tmp_path, capsys):
    line = cli_error(capsys, "zoo", "download", PRESET, "--url", "notaurl", "--cache", tmp_path / "c", "--no-progress")
    assert "notaurl" in line and "full URL" in line
    assert not (tmp_path / "c").exists()


def test_zoo_download_cache_is_a_file(tmp_path, capsys):
    src = tmp_path / "src.pth"
    save_checkpoint(src, tiny_model(), PRESET)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = cli_error(capsys, "zoo", "download", PRESET, "--url", src.as_uri(), "--cache", blocker, "--no-progress")
    assert "a-file" in line and "--cache" in line
    assert blocker.read_text() == "x"


def test_predict_writes_a_legend_of_the_class_colours(photos, checkpoint, tmp_path, capsys):
    """The label maps and overlays carry colours only: legend.png names them (classes_legend.png when an input is
    itself called legend)."""
    from danet.presets import get_preset

    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(photos), "--out", str(out)]) == 0
    assert "the classes' colours in legend.png" in capsys.readouterr().out
    legend = np.asarray(Image.open(out / "legend.png").convert("RGB"))
    preset = get_preset("danet_tiny_synthetic")
    for i, colour in enumerate(preset.palette):  # each row's swatch, in the class's colour
        assert tuple(legend[10 + 22 * i + 11, 20]) == tuple(colour)
    named = tmp_path / "named"
    named.mkdir()
    Image.open(next(p for p in Path(photos).iterdir() if p.is_file())).save(named / "legend.jpg")
    assert main(["predict", "--checkpoint", str(checkpoint), str(named), "--out", str(tmp_path / "o2")]) == 0
    assert {p.name for p in (tmp_path / "o2").iterdir()} == {"legend.png", "classes_legend.png"}


def test_predict_segments_at_the_sizes_the_run_trained_at(tmp_path):
    """A run's `--set data.base_size=... data.crop_size=...` (its config in the checkpoint) decide predict's resize
    and windows, also with --preset naming the run's preset; another preset's sizes are its own; a malformed config
    falls back to the preset's."""
    from danet.checkpoints import read_checkpoint
    from danet.engine.predict import Predictor, run_sizes
    from danet.presets import get_preset

    preset = get_preset("danet_tiny_synthetic")
    path = tmp_path / "run.pth"
    save_checkpoint(
        path, tiny_model(), preset, extra_meta={"config": {"data": {"base_size": [96, 48], "crop_size": [40, 40]}}}
    )
    run = Predictor(path, device="cpu")
    assert run.base_size == (96, 48) and run.crop == (40, 40)
    named = Predictor(path, "danet_tiny_synthetic", device="cpu")
    assert named.base_size == (96, 48) and named.crop == (40, 40)
    ck = read_checkpoint(path)
    assert run_sizes(ck, "danet_r50-d8_ade20k") == {} and run_sizes(ck, preset.name)["base_size"] == (96, 48)
    save_checkpoint(path, tiny_model(), preset, extra_meta={"config": {"data": {"base_size": [96, "x"]}}})
    assert Predictor(path, device="cpu").base_size == preset.base_size


def test_danet_test_checks_a_stride_against_the_run_s_window(tmp_path, capsys):
    """A run trained at a 128 px crop slides 128 px windows: --stride 100 is valid there (the preset's crop is 64)."""
    from danet.presets import get_preset
    from test_faults_common import tiny_folder_dataset

    preset = get_preset("danet_tiny_synthetic")
    assert preset.crop_size == (64, 64)
    path = tmp_path / "run.pth"
    save_checkpoint(path, tiny_model(), preset, extra_meta={"config": {"data": {"crop_size": [128, 128]}}})
    (tmp_path / "data").mkdir()
    data = tiny_folder_dataset(tmp_path / "data")
    argv = ["test", "danet_tiny_synthetic", "--checkpoint", str(path), "--data-root", str(data), "--mode", "slide"]
    assert main([*argv, "--stride", "100", "100", "--no-progress", "--json", str(tmp_path / "m.json")]) == 0
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["crop"] == [128, 128]
    assert "at most the window [128, 128]" in cli_error(capsys, *argv, "--stride", "129", "129")


def test_predict_s_note_says_where_the_classes_come_from(tmp_path, capsys):
    """A converted file records its classes and palette without a preset: the note said they were 'numbered and
    coloured as VOC's' though the labels took the file's colours."""
    mmseg = Path(__file__).parent / "fixtures" / "models" / "mmseg_d16.pth"
    conv = tmp_path / "conv.pth"
    assert main(["convert", str(mmseg), str(conv)]) == 0
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    notes = {}
    for ck in (conv, mmseg):
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "a.png"), "--out", str(tmp_path / ck.stem),
                     "--no-progress"]) == 0  # fmt: skip
        notes[ck] = capsys.readouterr().err
    assert "classes are named and coloured as the file records them" in notes[conv]
    assert "classes are numbered and coloured as VOC's" in notes[mmseg]
