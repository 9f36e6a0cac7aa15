"""Fault injection: bad input to the CLI. Each fault gives one line on stderr, exit status 2, no traceback, and leaves
earlier outputs (a work dir's last.pth / best.pth / metrics.json, an existing --json file) with their bytes.

Data faults use a tiny folder dataset with the synthetic preset's classes (4 train + 2 val images of 64x48), each
fault in a fresh copy: corrupt and truncated images, labels of another size or with values outside the classes,
missing masks, empty splits, wrong layouts. Grayscale, RGBA and 16-bit images must be handled (read as RGB uint8).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

import danet
from danet.cli import main
from danet.config import load_run_config
from test_faults_common import cli_error, cli_error_subprocess, digest

PRESET = "danet_tiny_synthetic"
H, W = 48, 64
FAST = [
    "--set", "schedule.epochs=1", "--set", "schedule.iters_per_epoch=1", "--set", "schedule.batch_size=2",
    "--set", "data.crop_size=[32,32]", "--set", "data.val_limit=1", "--set", "progress=false", "--set", "device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "clean"
    (root / "classes.yaml").parent.mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump(list(danet.get_preset(PRESET).classes)))
    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.png"), rng.integers(0, 255, (H, W, 3), np.uint8))
            Image.fromarray(rng.integers(0, 5, (H, W), np.uint8)).save(root / "masks" / split / f"{i:03d}.png")
    return root


def copy_with(dataset: Path, tmp_path: Path, fault) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    fault(root)
    return root


def previous_run(tmp_path: Path, checkpoint: Path) -> tuple[Path, dict[str, str]]:
    """A work dir holding a previous run's outputs, and their digests."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(checkpoint, work / "last.pth")
    shutil.copy(checkpoint, work / "best.pth")
    (work / "metrics.json").write_text('{"mIoU": 42.0}\n')
    return work, {p.name: digest(p) for p in work.iterdir()}


def assert_untouched(work: Path, before: dict[str, str]) -> None:
    for name, d in before.items():
        assert (work / name).exists() and digest(work / name) == d, f"{name} was changed by a failing command"


# ------------------------------------------------------------------------------------------------- data faults
def _truncate(path: Path, keep: float = 0.3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


FAULTS = {
    "truncated image": (lambda r: _truncate(r / "images/validation/001.png"), "001.png"),
    "text as image": (lambda r: (r / "images/validation/001.png").write_text("not a png"), "001.png"),
    "empty image file": (lambda r: (r / "images/validation/001.png").write_bytes(b""), "001.png"),
    "label of another size": (
        lambda r: Image.fromarray(np.zeros((10, 10), np.uint8)).save(r / "masks/validation/001.png"),
        "001.png",
    ),
    "label value out of range": (
        lambda r: Image.fromarray(np.full((H, W), 7, np.uint8)).save(r / "masks/validation/001.png"),
        "[7]",
    ),
    "corrupt label": (lambda r: _truncate(r / "masks/validation/001.png", 0.5), "001.png"),
    "missing label": (lambda r: (r / "masks/validation/001.png").unlink(), "001.png"),
    "empty split": (lambda r: [p.unlink() for p in (r / "images/validation").iterdir()], "no images"),
    "no images folder": (lambda r: shutil.rmtree(r / "images"), "images/"),
    "no classes file": (lambda r: (r / "classes.yaml").unlink(), "classes"),
    "classes of another dataset": (lambda r: (r / "classes.yaml").write_text("[sky, road]\n"), "classes"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_data_fault_in_test_command(fault, dataset, checkpoint, tmp_path, capsys):
    make, hint = FAULTS[fault]
    root = copy_with(dataset, tmp_path, make)
    out = tmp_path / "metrics.json"
    out.write_text('{"previous": true}\n')
    before = digest(out)
    argv = ["test", PRESET, "--checkpoint", checkpoint, "--data-root", root, "--json", out, "--no-progress"]
    line = cli_error(capsys, *argv)
    assert hint in line
    assert digest(out) == before


def test_data_fault_met_by_a_reader_process_is_one_line(dataset, checkpoint, tmp_path, capsys):
    """`danet test --workers 1` (a GPU's default reads images ahead in processes): the worker's error, one line."""
    root = copy_with(dataset, tmp_path, FAULTS["truncated image"][0])
    argv = ["test", PRESET, "--checkpoint", checkpoint, "--data-root", root, "--no-progress", "--workers", "1"]
    line = cli_error(capsys, *argv)
    assert "001.png" in line and "DataLoader" not in line and "Traceback" not in line


def test_data_fault_subprocess_has_one_line(dataset, checkpoint, tmp_path):
    """Through a fresh interpreter: nothing else (e.g. OpenCV's decoder warnings) reaches stderr."""
    root = copy_with(dataset, tmp_path, FAULTS["truncated image"][0])
    line = cli_error_subprocess("test", PRESET, "--checkpoint", checkpoint, "--data-root", root, "--no-progress")
    assert "001.png" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_train_image_stops_training(workers, dataset, checkpoint, tmp_path, capsys):
    """A corrupt image met while training (also inside a DataLoader worker): one line, previous outputs intact."""

    def corrupt_all_train_images(r: Path) -> None:
        for p in (r / "images/training").iterdir():
            _truncate(p)

    root = copy_with(dataset, tmp_path, corrupt_all_train_images)
    work, before = previous_run(tmp_path, checkpoint)
    # overwrite=true: get past the "work dir already holds a run" guard, to the data error
    argv = ["train", PRESET, "--data-root", root, "--work-dir", work, *FAST, "--set", f"data.num_workers={workers}"]
    line = cli_error(capsys, *argv, "--set", "overwrite=true")
    assert "images/training/" in line and "corrupt" in line
    assert "Traceback" not in line and "DataLoader worker" not in line
    assert_untouched(work, before)


def test_data_check_lists_every_fault(dataset, tmp_path, capsys):
    def several(r: Path) -> None:
        _truncate(r / "images/training/001.png")
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(r / "masks/training/002.png")
        Image.fromarray(np.full((H, W), 9, np.uint8)).save(r / "masks/validation/000.png")

    root = copy_with(dataset, tmp_path, several)
    rc = main(["data", "check", PRESET, "--data-root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "training/001.png" in out and "training/002.png" in out and "validation/000.png" in out


# ----------------------------------------------------------------------------------------- image formats handled
def _formats(r: Path) -> None:
    g = np.random.default_rng(1)
    cv2.imwrite(str(r / "images/validation/000.png"), g.integers(0, 255, (H, W), np.uint8))  # grayscale
    cv2.imwrite(str(r / "images/validation/001.png"), g.integers(0, 255, (H, W, 4), np.uint8))  # RGBA
    cv2.imwrite(str(r / "images/training/000.png"), g.integers(0, 65535, (H, W, 3), np.uint16))  # 16-bit RGB
    cv2.imwrite(str(r / "images/training/001.png"), g.integers(0, 65535, (H, W), np.uint16))  # 16-bit gray


def test_grayscale_rgba_16bit_images_are_read_as_rgb(tmp_path):
    from danet.data.io import read_image

    g = np.random.default_rng(2)
    gray = g.integers(0, 255, (H, W), np.uint8)
    rgba = g.integers(0, 255, (H, W, 4), np.uint8)
    deep = g.integers(0, 65535, (H, W, 3), np.uint16)
    for name, arr in (("gray", gray), ("rgba", rgba), ("deep", deep)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), arr)
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (H, W, 3) and out.dtype == np.uint8 and (out == gray[..., None]).all()
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (H, W, 3) and (out == rgba[..., 2::-1]).all()  # BGRA on disk -> RGB, alpha dropped
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and (out == (deep[..., ::-1] >> 8)).all()


def test_unusual_image_formats_test_and_check(dataset, checkpoint, tmp_path, capsys):
    root = copy_with(dataset, tmp_path, _formats)
    rc = main(["test", PRESET, "--checkpoint", str(checkpoint), "--data-root", str(root), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert main(["data", "check", PRESET, "--data-root", str(root), "--no-progress"]) == 0


# ------------------------------------------------------------------------------------------------- names, paths
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "danet_r50_nope"],
        ["test", "danet_r50_nope", "--checkpoint", "{ck}"],
        ["data", "check", "danet_r50_nope"],
        ["export", "{ck}", "--onnx", "{tmp}/m.onnx", "--preset", "danet_r50_nope"],
        ["convert", "{ck}", "{tmp}/c.pth", "--preset", "danet_r50_nope"],
    ],
    ids=["train", "test", "data-check", "export", "convert"],
)
def test_unknown_preset_lists_valid_names(argv, checkpoint, tmp_path, capsys):
    argv = [a.format(ck=checkpoint, tmp=tmp_path) for a in argv]
    line = cli_error(capsys, *argv)
    assert "danet_r50_nope" in line and PRESET in line and "danet_r101-d8_cityscapes" in line


def test_missing_paths(dataset, checkpoint, tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    assert "nowhere" in cli_error(capsys, "train", PRESET, "--data-root", nowhere, "--work-dir", tmp_path / "w", *FAST)
    assert "nowhere" in cli_error(capsys, "test", PRESET, "--checkpoint", nowhere / "m.pth", "--data-root", dataset)
    assert "nowhere" in cli_error(capsys, "test", PRESET, "--checkpoint", checkpoint, "--data-root", nowhere)
    assert "nowhere" in cli_error(capsys, "predict", "--checkpoint", checkpoint, nowhere / "a.jpg", "--out", tmp_path)
    assert "nowhere" in cli_error(capsys, "train", nowhere / "run.yaml")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["train", "predict", "test", "convert", "export"])
def test_unwritable_output(command, dataset, checkpoint, tmp_path, capsys):
    """An output path below a regular file (fails as root too, unlike permission bits): one line, nothing written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = {
        "train": ["train", PRESET, "--data-root", dataset, "--work-dir", blocker / "run", *FAST],
        "predict": ["predict", "--checkpoint", checkpoint, dataset / "images/validation", "--out", blocker / "out"],
        "test": ["test", PRESET, "--checkpoint", checkpoint, "--data-root", dataset, "--json", blocker / "m.json",
                 "--no-progress"],
        "convert": ["convert", checkpoint, blocker / "c.pth"],
        "export": ["export", checkpoint, "--onnx", blocker / "m.onnx"],
    }[command]  # fmt: skip
    line = cli_error(capsys, *argv)
    assert "a-file" in line
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ------------------------------------------------------------------------------------------------ --set overrides
BAD_SETS = {
    "unknown key": ("schedule.epochz=2", "schedule.epochs"),  # the message lists the valid keys
    "unknown section": ("optim.lr=0.1", "schedule.lr"),
    "no value": ("schedule.epochs", "key=value"),
    "not an integer": ("schedule.epochs=two", "integer"),
    "not a number": ("schedule.lr=fast", "number"),
    "bad choice": ("amp=fp8", "bf16"),
    "bad tuple": ("data.crop_size=[1,2,3]", "crop_size"),
    "unknown model key": ("model.width=3", "head_channels"),
    "bad depth": ("model.depth=51", "depth"),
    "bad output stride": ("model.output_stride=7", "output_stride"),
    "zero batch": ("schedule.batch_size=0", "batch"),
    "negative workers": ("data.num_workers=-1", "num_workers"),
    "zero crop": ("data.crop_size=[0,0]", "crop"),
    "zero epochs": ("schedule.epochs=0", "epochs"),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_set_is_one_line_and_touches_nothing(case, dataset, checkpoint, tmp_path, capsys):
    override, hint = BAD_SETS[case]
    work, before = previous_run(tmp_path, checkpoint)
    (work / "log.jsonl").write_text('{"type": "start", "iter": 0}\n')
    (work / "config.yaml").write_text("preset: danet_tiny_synthetic\n")
    before = {p.name: digest(p) for p in work.iterdir()}
    line = cli_error(capsys, "train", PRESET, "--data-root", dataset, "--work-dir", work, *FAST, "--set", override)
    assert hint in line
    assert_untouched(work, before)
    assert sorted(p.name for p in work.iterdir()) == sorted(before)


def test_set_accepts_scientific_notation():
    """`--set schedule.lr=1e-3` is how people write learning rates (YAML 1.1 reads it as a string)."""
    cfg = load_run_config(PRESET, ["schedule.lr=1e-3", "schedule.weight_decay=5e-4", "schedule.min_lr=1E-6"])
    assert cfg.schedule.lr == pytest.approx(1e-3)
    assert cfg.schedule.weight_decay == pytest.approx(5e-4)
    assert cfg.schedule.min_lr == pytest.approx(1e-6)


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("preset: [unclosed\n")
    assert "YAML" in cli_error(capsys, "train", bad)
    bad.write_text("preset: danet_tiny_synthetic\nschedule: {epochz: 3}\n")
    assert "schedule.epochz" in cli_error(capsys, "train", bad)
