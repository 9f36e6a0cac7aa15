"""Fault injection: hostile and broken checkpoint files.

- No code from files: pickles whose loading would create a marker file (via `open`, `os.system` or `eval`), as a bare
  pickle, inside a torch zip checkpoint (in the meta, as the whole object, in place of a weight) and in torch's
  legacy format, are read through every entry point (read_checkpoint, create_model, `danet convert / export / test /
  predict`, `danet train --resume` and `init_checkpoint`): each either refuses with a DanetError or yields tensors
  only, and the marker never appears. A control test proves the payloads are live (plain unpickling creates it).
- Truncated files, non-checkpoints (a PNG, a text file) and checkpoints of another class count or depth: one-line
  errors, exit status 2, no traceback (in-process and through `python -m danet.cli`).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import danet
from danet.checkpoints import read_checkpoint, save_checkpoint
from danet.errors import DanetError
from test_faults_common import cli_error, cli_error_subprocess, digest, tiny_folder_dataset, tiny_model

PRESET = "danet_tiny_synthetic"


class OpenPayload:
    """Unpickling it runs `open(marker, "w")`, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemPayload:
    """Unpickling it runs `os.system("touch marker")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class EvalPayload:
    """Unpickling it runs `eval("open(marker, 'w')")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w')",))


PAYLOADS = {"open": OpenPayload, "system": SystemPayload, "eval": EvalPayload}


def _good_checkpoint_obj(payload) -> dict:
    """Our checkpoint format with a payload hidden in the meta (a realistic tampered file)."""
    model = tiny_model()
    return {
        "format": "danet",
        "version": 1,
        "model": model.state_dict(),
        "meta": {"preset": PRESET, "model_cfg": model.cfg.to_dict(), "note": payload},
    }


def make_malicious(kind: str, tmp_path: Path) -> tuple[Path, Path]:
    """(file, marker) for one kind of hostile file; the marker must never exist."""
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pth"
    if kind.startswith("pickle-"):  # a bare pickle, the payload at the top and inside a dict
        payload = PAYLOADS[kind.split("-", 1)[1]](marker)
        path.write_bytes(pickle.dumps({"state_dict": {"w": payload}, "x": payload}))
    elif kind == "zip-meta":  # a torch zip checkpoint of ours, one meta value is the payload
        torch.save(_good_checkpoint_obj(OpenPayload(marker)), path)
    elif kind == "zip-top":  # a torch zip file whose whole object is the payload
        torch.save(SystemPayload(marker), path)
    elif kind == "zip-tensor":  # the payload in place of a weight of a mmseg-style file
        obj = {"state_dict": {"decode_head.conv_seg.weight": EvalPayload(marker)}, "meta": {}}
        torch.save(obj, path)
    elif kind == "legacy-meta":  # torch's pre-1.6 (non-zip) format
        torch.save(_good_checkpoint_obj(OpenPayload(marker)), path, _use_new_zipfile_serialization=False)
    else:
        raise AssertionError(kind)
    assert not marker.exists()
    return path, marker


KINDS = ["pickle-open", "pickle-system", "pickle-eval", "zip-meta", "zip-top", "zip-tensor", "legacy-meta"]


@pytest.mark.parametrize("kind", ["pickle-open", "pickle-system", "zip-meta", "legacy-meta"])
def test_payloads_are_live(kind, tmp_path):
    """Control: an unrestricted load of these files does run the payload (so the tests below can fail)."""
    path, marker = make_malicious(kind, tmp_path)
    if kind.startswith("pickle-"):
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def _assert_inert(ck) -> None:
    """A checkpoint that did load holds tensors as weights, and no object the payload could have produced."""
    assert ck.state_dict and all(isinstance(v, torch.Tensor) for v in ck.state_dict.values())
    assert not isinstance(ck.meta.get("note"), io.IOBase | int)  # a file object of open(), os.system's status


@pytest.mark.parametrize("kind", KINDS)
def test_read_checkpoint_runs_no_code(kind, tmp_path):
    path, marker = make_malicious(kind, tmp_path)
    try:
        ck = read_checkpoint(path)
    except DanetError as e:
        assert "\n" not in str(e)
    else:
        _assert_inert(ck)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle-system", "zip-meta", "zip-top", "legacy-meta"])
def test_create_model_runs_no_code(kind, tmp_path):
    path, marker = make_malicious(kind, tmp_path)
    try:
        model = danet.create_model(PRESET, checkpoint=path)
    except DanetError:
        pass
    else:  # the tampered file of ours holds good weights: they load, the payload stays inert
        assert kind in ("zip-meta", "legacy-meta")
        assert isinstance(model, danet.DANet)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle-open", "zip-meta", "zip-top", "zip-tensor"])
def test_convert_cli_runs_no_code(kind, tmp_path, capsys):
    from danet.cli import main

    path, marker = make_malicious(kind, tmp_path)
    out = tmp_path / "converted.pth"
    rc = main(["convert", str(path), str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 0:  # converted: the result is a clean file of tensors, loadable with weights_only=True
        assert kind == "zip-meta"
        obj = torch.load(out, weights_only=True)
        assert "pwned" not in repr(obj["meta"])
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert not out.exists()
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle-eval", "zip-meta", "zip-top", "legacy-meta"])
def test_export_cli_runs_no_code(kind, tmp_path, capsys):
    from danet.cli import main

    path, marker = make_malicious(kind, tmp_path)
    out = tmp_path / "model.onnx"
    rc = main(["export", str(path), "--onnx", str(out), "--size", "32", "32", "--no-verify"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == (0 if kind in ("zip-meta", "legacy-meta") else 2), err
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_folder_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("kind", ["pickle-open", "zip-meta", "zip-top", "legacy-meta"])
@pytest.mark.parametrize("command", ["test", "predict", "train-resume", "train-init"])
def test_engine_commands_run_no_code(command, kind, tiny_data, tmp_path, capsys):
    """`danet test / predict / train --resume / init_checkpoint` with a hostile file: the marker never appears.

    Each command gets everything else right, so it does load the file; a command whose (tampered but valid) file
    loads stops right after: `test` on a data root without a val split, `predict` on an output path below a file,
    `train` on a batch larger than the one training image.
    """
    from danet.cli import main

    path, marker = make_malicious(kind, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    image = tiny_data / "images" / "validation" / "a.png"
    argv = {
        "test": ["test", PRESET, "--checkpoint", path, "--data-root", tiny_data, "--split", "nosuchsplit",
                 "--no-progress"],
        "predict": ["predict", "--checkpoint", path, image, "--out", blocker / "out"],
        "train-resume": ["train", "--resume", path, "--data-root", tiny_data, "--work-dir", tmp_path / "w"],
        "train-init": ["train", PRESET, "--data-root", tiny_data, "--work-dir", tmp_path / "w",
                       "--set", f"init_checkpoint={path}", "--set", "device=cpu", "--set", "schedule.batch_size=2"],
    }[command]  # fmt: skip
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert not marker.exists()


def test_malicious_checkpoint_subprocess_one_line(tmp_path):
    path, marker = make_malicious("pickle-system", tmp_path)
    line = cli_error_subprocess("export", path, "--onnx", tmp_path / "m.onnx")
    assert "checkpoint" in line.lower()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- broken / foreign files
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "good.pth"
    save_checkpoint(path, tiny_model(), PRESET)
    return path


def _truncated(good: Path, tmp_path: Path, keep: float = 0.5) -> Path:
    data = good.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pth"
    path.write_text("these are not the weights you are looking for\n")
    return path


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_checkpoint_read(good_checkpoint, tmp_path, keep):
    path = _truncated(good_checkpoint, tmp_path, keep)
    assert zipfile.is_zipfile(good_checkpoint)
    with pytest.raises(DanetError, match="truncated|corrupt|not a PyTorch") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make", [_png, _text])
def test_non_checkpoint_read(make, tmp_path):
    with pytest.raises(DanetError) as e:
        read_checkpoint(make(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_checkpoint(tmp_path, capsys):
    line = cli_error(capsys, "export", tmp_path / "nope.pth", "--onnx", tmp_path / "m.onnx")
    assert "nope.pth" in line
    line = cli_error(capsys, "convert", tmp_path / "nope.pth", tmp_path / "out.pth")
    assert "nope.pth" in line


@pytest.mark.parametrize("which", ["truncated", "png", "text"])
def test_broken_files_cli_one_line(which, good_checkpoint, tmp_path, capsys):
    path = {"truncated": lambda: _truncated(good_checkpoint, tmp_path), "png": lambda: _png(tmp_path),
            "text": lambda: _text(tmp_path)}[which]()  # fmt: skip
    out = tmp_path / "out.pth"
    out.write_bytes(b"previous output")
    before = digest(out)
    cli_error(capsys, "convert", path, out)
    cli_error(capsys, "export", path, "--onnx", tmp_path / "m.onnx")
    cli_error(capsys, "test", PRESET, "--checkpoint", path, "--data-root", tmp_path / "nodata", "--no-progress")
    (tmp_path / "inputs").mkdir()
    image = _png(tmp_path / "inputs")
    line = cli_error(capsys, "predict", "--checkpoint", path, image, "--out", tmp_path / "pred")
    assert path.name in line  # the checkpoint is what is wrong
    assert digest(out) == before  # an earlier output keeps its bytes
    assert not (tmp_path / "m.onnx").exists()


def test_broken_files_subprocess_one_line(good_checkpoint, tmp_path):
    line = cli_error_subprocess("convert", _truncated(good_checkpoint, tmp_path), tmp_path / "out.pth")
    assert "truncated" in line or "corrupt" in line


def test_checkpoint_of_other_class_count(tmp_path, capsys):
    path = tmp_path / "seven.pth"
    save_checkpoint(path, tiny_model(num_classes=7), None)
    with pytest.raises(DanetError, match="7 classes") as e:
        danet.create_model(PRESET, checkpoint=path)
    assert "\n" not in str(e.value)
    with pytest.raises(DanetError, match="7 classes"):
        danet.create_model(PRESET, checkpoint=path, num_classes=3)
    line = cli_error(capsys, "convert", path, tmp_path / "out.pth", "--preset", PRESET)
    assert "7 classes" in line
    line = cli_error(capsys, "export", path, "--onnx", tmp_path / "m.onnx", "--preset", PRESET)
    assert "7 classes" in line
    line = cli_error(capsys, "test", PRESET, "--checkpoint", path, "--data-root", tmp_path, "--no-progress")
    assert "7 classes" in line


def test_checkpoint_of_other_depth(tmp_path, capsys):
    path = tmp_path / "deep.pth"
    save_checkpoint(path, tiny_model(depth=50), None)
    with pytest.raises(DanetError, match="ResNet-50") as e:
        danet.create_model(PRESET, checkpoint=path)
    assert "\n" not in str(e.value)
    line = cli_error(capsys, "convert", path, tmp_path / "out.pth", "--preset", PRESET)
    assert "ResNet-50" in line


def test_checkpoint_with_missing_weights(good_checkpoint, tmp_path):
    obj = torch.load(good_checkpoint, weights_only=True)
    del obj["model"]["head.pam_out.conv.weight"]
    path = tmp_path / "partial.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="missing") as e:
        danet.create_model(PRESET, checkpoint=path)
    assert "\n" not in str(e.value)
