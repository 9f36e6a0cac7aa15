"""Faults found by an exploratory review of `danet predict` and `danet.Predictor`: TTA on slivers of images,
inputs of one name, a legend that took an input's label map, models of more than 255 classes, unchecked
Predictor options, and the hints that followed an unwritable output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import danet
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.engine.inference import rescale
from danet.errors import DanetError
from test_faults_common import cli_error, digest

PRESET = "danet_tiny_synthetic"


def photo(path: Path, h: int = 40, w: int = 56, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("h", "w"), [(1, 1), (4, 900), (900, 3)])
def test_tta_on_slivers_of_images(checkpoint, tmp_path, h, w):
    src = photo(tmp_path / "in" / "thin.png", h, w)
    argv = ["predict", "--checkpoint", str(checkpoint), str(src), "--out", str(tmp_path / "o"), "--tta"]
    assert main([*argv, "--no-resize"]) == 0
    assert Image.open(tmp_path / "o" / "thin.png").size == (w, h)
    assert main(argv) == 0


def test_tta_views_keep_the_toolboxes_scale_factor():
    """Where no side becomes 0 the view is F.interpolate(scale_factor=s) exactly (the toolboxes' sampling grid)."""
    x = torch.rand(1, 3, 37, 53, dtype=torch.float64)
    for s in (0.5, 0.75, 1.25, 1.75):
        want = torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        assert torch.equal(rescale(x, s), want)
    assert rescale(torch.rand(1, 3, 1, 9), 0.75).shape[-2:] == (1, 6)


def test_inputs_of_one_name_are_written_apart_and_said_so(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    for name in ("a.png", "a.jpg", "a_1.png", "legend.png", "classes_legend.jpg"):
        photo(src / name)
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(src), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{src / 'a.png'} -> a_png.png" in said and "classes' colours in classes_legend_1.png" in said
    # a.jpg (first in order) -> a.png, a.png -> a_png.png; legend.png and classes_legend.jpg keep their names
    written = {p.name for p in out.iterdir()}
    assert written == {"a.png", "a_png.png", "a_1.png", "legend.png", "classes_legend.png", "classes_legend_1.png"}
    assert Image.open(out / "classes_legend.png").mode == "P"  # a label map, not the legend


def test_more_than_255_classes_is_refused_in_one_line(tmp_path, capsys):
    ck = tmp_path / "c300.pth"
    save_checkpoint(ck, danet.create_model(PRESET, num_classes=300), PRESET)
    line = cli_error(capsys, "predict", "--checkpoint", ck, photo(tmp_path / "a.png"), "--out", tmp_path / "o")
    assert "has 300 classes; label maps are 8-bit (255 = ignore), so prediction takes at most 255" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("option", "value"), [("mode", "bogus"), ("amp", "fp8"), ("merge", "mean")])
def test_predictor_options_are_checked(checkpoint, option, value):
    predictor = danet.Predictor(checkpoint)
    with pytest.raises(DanetError, match=rf"Predictor {option}='{value}': give one of"):
        predictor(np.zeros((16, 16, 3), np.uint8), **{option: value})


@pytest.mark.parametrize("value", [0, -1, "x", 2.5, True])
def test_predictor_max_pixels_is_checked(checkpoint, value):
    with pytest.raises(DanetError, match=r"Predictor max_pixels=.*: give a whole number of pixels, at least 1"):
        danet.Predictor(checkpoint)(np.zeros((16, 16, 3), np.uint8), max_pixels=value)
    assert danet.Predictor(checkpoint)(np.zeros((16, 16, 3), np.uint8), max_pixels=np.int64(64)).shape == (16, 16)


def test_base_views_without_resizing_get_the_cli_words(checkpoint, tmp_path, capsys):
    argv = ["predict", "--checkpoint", checkpoint, photo(tmp_path / "a.png"), "--out", tmp_path / "o", "--tta"]
    line = cli_error(capsys, *argv, "--tta-views", "base", "--no-resize")
    assert "--tta-views base resizes the image to the base size times each scale, which --no-resize turns off" in line
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_folder_gets_the_right_hint(checkpoint, tmp_path, capsys):
    src = photo(tmp_path / "in" / "a.png")
    out = tmp_path / "o"
    (out / "a.png").mkdir(parents=True)  # where the label map goes
    legend = photo(out / "legend.png")
    before = digest(legend)
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, src, "--out", out, "--no-progress")
    assert "Is a directory; a folder has that name: move it or pick another --out" in line and "free" not in line
    assert digest(legend) == before


def test_a_pipe_closed_by_its_reader_ends_quietly(tmp_path):
    """`danet zoo | head -1`: the reader goes away; no error line, the exit status a shell gives SIGPIPE."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        done = subprocess.run(
            [sys.executable, "-m", "danet.cli", "zoo", "--json"], stdout=write, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == b"", done.stderr.decode()


def test_a_pipe_or_device_as_input_is_named_so(checkpoint, tmp_path, capsys):
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, "/dev/null", "--out", tmp_path / "o")
    assert "/dev/null is not a regular file" in line


def test_a_checkpoint_written_onto_a_folder_or_under_a_file_says_which(tmp_path, capsys, monkeypatch):
    src = Path(__file__).parent / "fixtures" / "models" / "ssseg_d8.pth"
    saves: list = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(1) or real_save(*a, **k))
    line = cli_error(capsys, "convert", src, tmp_path)
    assert f"could not write checkpoint {tmp_path}: it is a folder; give a file name" in line
    assert not saves  # refused before anything was written (a temporary file went into the folder's parent)
    (tmp_path / "a-file").write_text("x")
    line = cli_error(capsys, "convert", src, tmp_path / "a-file" / "out.pth")
    assert "a-file is a file, not a folder: give another path" in line and "free disk space" not in line


def test_predict_writes_outputs_whose_names_are_long_or_not_utf8(checkpoint, tmp_path, capsys):
    """A legal 252-byte name failed on its temporary file's ('File name too long; pick another --out', after the
    model had run), and a name that is not valid UTF-8 stopped the run with a UnicodeEncodeError where stdout's
    encoding is strict (capsys': the names are printed escaped)."""
    import os

    long_stem, odd_stem = "b" * 240, os.fsdecode(b"bad\xffname")
    for stem in (long_stem, odd_stem):
        photo(tmp_path / "in" / f"{stem}.png")
    out = tmp_path / odd_stem  # printed in the last line
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--overlay"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["legend.png", *(f"{s}{end}" for s in (long_stem, odd_stem) for end in (".png", "_overlay.jpg"))]
    )
    assert "bad\\udcffname" in capsys.readouterr().out


def test_predict_on_a_folder_skips_hidden_files_and_folders(checkpoint, tmp_path):
    """A macOS '._b.png' beside b.png stopped the whole run as a corrupt image, and files under .git/ were
    segmented: a folder's hidden files and folders are skipped, as the datasets skip them; one named itself is read."""
    photo(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "._b.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    photo(tmp_path / "in" / ".git" / "logo.png")
    out = tmp_path / "o"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "legend.png"]
    hidden = photo(tmp_path / "x" / ".named.png")
    assert main(["predict", "--checkpoint", str(checkpoint), str(hidden), "--out", str(out)]) == 0
    assert (out / ".named.png").is_file()


def test_a_warning_on_the_command_line_is_one_line(tmp_path):
    """A checkpoint of another output stride than the preset asked for warns; on the command line that was Python's
    'predict.py:236: UserWarning: ...' and the line of source code after it: one line now, as a note is."""
    from test_faults_common import run_cli, saved_tiny_checkpoint

    ck = saved_tiny_checkpoint(tmp_path, "d16.pth", output_stride=16)
    src = photo(tmp_path / "in" / "a.png")
    proc = run_cli("predict", "--checkpoint", ck, "--preset", PRESET, src, "--out", tmp_path / "o", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"warning: {ck.name} was saved with output_stride=16; running it at output_stride=8 as requested"]


def test_predict_out_that_is_a_file_is_one_line(checkpoint, tmp_path, capsys):
    src = photo(tmp_path / "in" / "a.png")
    (tmp_path / "outfile").write_text("mine")
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, src, "--out", tmp_path / "outfile")
    assert line.endswith("is a file, not a folder; give a folder for the predictions")
    assert (tmp_path / "outfile").read_text() == "mine"


def test_predictor_reads_a_16_bit_pil_image_as_danet_predict_reads_its_file(checkpoint, tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale to 0 or 255, where danet predict (OpenCV) keeps the high byte:
    only 71 % of a converted model's labels agreed. A float image is refused, as danet predict refuses its file."""
    import cv2

    from danet.data.io import read_image

    v = np.random.default_rng(0).integers(0, 65536, (40, 56), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), v)
    pil = Image.open(tmp_path / "g16.png")
    assert pil.mode.startswith("I")
    predictor = danet.Predictor(checkpoint)
    from_file = read_image(tmp_path / "g16.png")
    assert np.array_equal(from_file[..., 0], (v >> 8).astype(np.uint8))
    from danet.engine.predict import pil_rgb

    assert np.array_equal(pil_rgb(pil), from_file) and np.array_equal(predictor(pil), predictor(from_file))
    with pytest.raises(DanetError, match="floating-point samples"):
        predictor(Image.fromarray(v.astype(np.float32)))
    # a 32-bit "I" image of 8-bit values (Image.fromarray of int32, .convert("I")) keeps them, as convert("RGB") did
    eight = np.random.default_rng(1).integers(0, 256, (40, 56), dtype=np.int32)
    assert np.array_equal(pil_rgb(Image.fromarray(eight)), np.repeat(eight.astype(np.uint8)[..., None], 3, axis=2))


def test_predictor_switches_take_booleans_only(checkpoint):
    predictor = danet.Predictor(checkpoint)
    for kw in ({"tta": "yes"}, {"tta": "no"}, {"resize": 0}):
        with pytest.raises(DanetError, match=r"give True or False"):
            predictor(np.zeros((16, 16, 3), np.uint8), **kw)


def test_an_output_that_is_also_a_folder_of_outputs_is_refused_before_the_work(checkpoint, tmp_path, capsys):
    """a.jpg and a folder a.png/ holding x.png: a.jpg's label map a.png and the folder a.png/ of x.png's collided
    midway ('cannot write .../a.png/x.png: File exists; pick another --out'), after a.png was written."""
    photo(tmp_path / "in" / "a.jpg")
    photo(tmp_path / "in" / "a.png" / "x.png")
    line = cli_error(capsys, "predict", "--checkpoint", checkpoint, tmp_path / "in", "--out", tmp_path / "o")
    assert "would write" in line and "both as a file and as a folder; rename one" in line
    assert not (tmp_path / "o").exists()
