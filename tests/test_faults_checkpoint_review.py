"""Fault injection, found by a review: checkpoints whose contents are of the wrong type, size or form.

- Meta values of the wrong type or size (classes, palette, mean, std, preset, model_cfg, a run's sizes), in our
  files and in an mmseg file's dataset_meta: one line naming the file and the field (before: OverflowError,
  TypeError, a shape RuntimeError, an 85 GB allocation). A payload object in meta["classes"] never runs.
- Meta that is nested thousands deep or shares one list at every level (2**40 values from a 1 MB file): one line,
  quickly (before: RecursionError; a hang that exhausted memory).
- State dicts with keys that are not strings, or weights that are sparse, on the meta device or of an integer dtype:
  one line (before: AttributeError, NotImplementedError, "cannot be called on meta tensors").
- `danet convert` of a file of ours keeps its preset, classes and run settings (before: dropped, so predictions of
  the converted file differed); with --preset the preset's are used.
- An incomplete mmseg / ssseg file: the missing weight named as that file spells it.
- verify_archive: a bit flipped inside a zip checkpoint's data (which torch.load reads silently) is found by its CRC.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet import safe_load
from danet.checkpoints import load_model, read_checkpoint, save_checkpoint, verify_archive
from danet.errors import DanetError
from test_faults_common import cli_error, one_line, run_cli, tiny_model

PRESET = "danet_tiny_synthetic"
FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A checkpoint of ours as a `danet train` run writes it: preset, classes, palette and the run's sizes."""
    path = tmp_path_factory.mktemp("ck") / "synth.pth"
    run = {"preset": PRESET, "data": {"base_size": [96, 48], "crop_size": [40, 40]}}
    save_checkpoint(path, tiny_model(), PRESET, extra_meta={"config": run})
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path)
    return path


def _mmseg_state_dict() -> dict:
    return safe_load.load_file(FIXTURES / "mmseg_d8.pth")["state_dict"]


def _ssseg_state_dict() -> dict:
    return safe_load.load_file(FIXTURES / "ssseg_d8.pth")["model"]


# ------------------------------------------------------------------------------------------------ meta values
META_CASES = {
    "palette-300": ("palette", [[300, 0, 0]] * 5),
    "palette-rgba": ("palette", [[1, 2, 3, 4]] * 5),
    "palette-names": ("palette", ["red"] * 5),
    "palette-tensor": ("palette", torch.zeros(5, 3, dtype=torch.int64)),
    "palette-short": ("palette", [[1, 2, 3]] * 2),
    "classes-int": ("classes", 5),
    "classes-short": ("classes", ["a", "b"]),
    "classes-numbers": ("classes", [1, 2, 3, 4, 5]),
    "mean-two": ("mean", [1.0, 2.0]),
    "mean-text": ("mean", "abc"),
    "mean-tensor": ("mean", torch.zeros(3)),
    "mean-nan": ("mean", [float("nan"), 1.0, 1.0]),
    "std-zero": ("std", [1.0, 0.0, 1.0]),
    "model-cfg-tensor": ("model_cfg", torch.zeros(2)),
    "preset-int": ("preset", 5),
    "preset-list": ("preset", ["x"]),
    "config-text": ("config", "data: {}"),
}


@pytest.mark.parametrize(("field", "value"), list(META_CASES.values()), ids=list(META_CASES))
def test_meta_of_the_wrong_type_or_size(field, value, synth, image, tmp_path, capsys):
    obj = torch.load(synth, weights_only=True)
    obj["meta"][field] = value
    path = tmp_path / "badmeta.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match=f"its meta {field} is .*download or save it again") as e:
        read_checkpoint(path)
    assert str(path) in one_line(e)
    out = tmp_path / "out.pth"
    for argv in (
        ["convert", path, out],
        ["predict", "--checkpoint", path, image, "--out", tmp_path / "pred"],
        ["export", path, "--onnx", tmp_path / "m.onnx"],
    ):
        line = cli_error(capsys, *argv)
        assert f"meta {field}" in line and "badmeta.pth" in line
    assert not out.exists() and not (tmp_path / "pred").exists()


@pytest.mark.parametrize("size", [[100000, 100000], [0, 64], 100000])
def test_run_sizes_out_of_range(size, synth, image, tmp_path, capsys):
    assert read_checkpoint(synth).run_data["base_size"] == [96, 48]  # control: sizes in range are the run's
    obj = torch.load(synth, weights_only=True)
    obj["meta"]["config"]["data"]["base_size"] = size
    path = tmp_path / "huge.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="config.data.base_size is .*not sizes of 1..16384") as e:
        read_checkpoint(path)
    one_line(e)
    line = cli_error(capsys, "predict", "--checkpoint", path, image, "--out", tmp_path / "pred")
    assert "config.data.base_size" in line


@pytest.mark.parametrize(
    ("where", "value"),
    [("palette", [[999, 0, 0]] + [[0, 0, 0]] * 4), ("classes", ("a", "b"))],
    ids=["palette-999", "classes-short"],
)
def test_mmseg_dataset_meta_of_the_wrong_form(where, value, tmp_path, capsys):
    # control: the toolbox's own files load, their meta's "config" being text (a config file's name)
    assert read_checkpoint(FIXTURES / "mmseg_d8.pth").classes == [f"class{i}" for i in range(5)]
    assert isinstance(read_checkpoint(FIXTURES / "mmseg_d16.pth").meta["config"], str)
    meta = {"dataset_meta": {"classes": tuple(f"c{i}" for i in range(5)), "palette": [[0, 0, 0]] * 5}}
    meta["dataset_meta"][where] = value
    path = tmp_path / "mm.pth"
    torch.save({"meta": meta, "state_dict": _mmseg_state_dict()}, path)
    with pytest.raises(DanetError, match=f"its meta dataset_meta.{where} is ") as e:
        read_checkpoint(path)
    assert "mm.pth" in one_line(e)
    assert f"dataset_meta.{where}" in cli_error(capsys, "convert", path, tmp_path / "out.pth")


class SystemPayload:
    """Unpickling it runs `os.system("touch marker")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_payload_as_the_classes_runs_nothing(synth, image, tmp_path, capsys):
    obj = torch.load(synth, weights_only=True)
    marker = tmp_path / "pwned"
    obj["meta"]["classes"] = SystemPayload(marker)
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="its meta classes is '<not loaded: .*system>', not a list of names") as e:
        read_checkpoint(path)
    one_line(e)
    for argv in (["convert", path, tmp_path / "o.pth"], ["predict", "--checkpoint", path, image, "--out", tmp_path]):
        assert "meta classes" in cli_error(capsys, *argv)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- nested meta
def test_meta_sharing_one_list_at_every_level_is_refused_quickly(tmp_path):
    laughs: list = []
    for _ in range(40):
        laughs = [laughs, laughs]  # 2**40 values once expanded, a 1 MB file
    path = tmp_path / "laughs_meta.pth"
    torch.save({"model": _ssseg_state_dict(), "meta": {"x": laughs}}, path)
    start = time.monotonic()
    proc = run_cli("convert", path, tmp_path / "o.pth", timeout=60)  # before: ran until memory ran out
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "more than 100,000 values" in proc.stderr
    assert time.monotonic() - start < 60
    with pytest.raises(DanetError, match="laughs_meta.pth: its meta holds more than") as e:
        read_checkpoint(path)
    one_line(e)


def test_meta_nested_thousands_deep(tmp_path, capsys):
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    path = tmp_path / "deep.pth"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for torch.save's pickler
    try:
        torch.save({"state_dict": _mmseg_state_dict(), "meta": {"env": deep}}, path)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(DanetError, match="nests containers more than 100 deep") as e:
        read_checkpoint(path)
    one_line(e)
    assert "deep.pth" in cli_error(capsys, "convert", path, tmp_path / "o.pth")


# ---------------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize(
    "make",
    [
        lambda sd: {0: torch.zeros(1)},
        lambda sd: {("a", 1): torch.zeros(1)},
        lambda sd: {**sd, 7: torch.zeros(1)},
        lambda sd: {"format": "danet", "model": {**tiny_model().state_dict(), 3: torch.zeros(1)}},
    ],
    ids=["int-key", "tuple-key", "int-key-in-ssseg", "int-key-in-ours"],
)
def test_state_dict_keys_that_are_not_strings(make, tmp_path, capsys):
    path = tmp_path / "keys.pth"
    torch.save(make(_ssseg_state_dict()), path)
    with pytest.raises(DanetError, match="its state dict has a key .* not a name") as e:
        read_checkpoint(path)
    assert "keys.pth" in one_line(e)
    assert "not a name" in cli_error(capsys, "convert", path, tmp_path / "o.pth")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda w: w.to_sparse(), "torch.sparse_coo tensor, not a dense one"),
        (lambda w: w.to("meta"), "on the meta device"),
        (lambda w: w.to(torch.int32), "torch.int32 tensor where the model has torch.float32"),
        (lambda w: w.to(torch.bool), "torch.bool tensor where the model has torch.float32"),
    ],
    ids=["sparse", "meta-device", "int", "bool"],
)
def test_weights_that_are_not_dense_float_tensors(change, match, synth, tmp_path, capsys):
    obj = torch.load(synth, weights_only=True)
    obj["model"]["head.cls.conv.weight"] = change(obj["model"]["head.cls.conv.weight"])
    path = tmp_path / "weird.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match=match) as e:
        load_model(path)
    assert "head.cls.conv.weight" in one_line(e)
    assert "head.cls.conv.weight" in cli_error(capsys, "convert", path, tmp_path / "o.pth")


def test_foreign_meta_that_is_a_tensor_is_ignored(tmp_path):
    path = tmp_path / "ssseg.pth"
    torch.save({"meta": torch.zeros(3), "model": _ssseg_state_dict()}, path)
    ck = read_checkpoint(path)
    assert ck.source == "ssseg" and ck.classes is None
    load_model(ck)


# ------------------------------------------------------------------------------------------------ convert
def test_convert_keeps_what_a_file_of_ours_records(synth, image, tmp_path, capsys):
    from danet.cli import main
    from danet.engine.predict import Predictor

    out = tmp_path / "out.pth"
    capsys.readouterr()
    assert main(["convert", str(synth), str(out)]) == 0
    assert f"preset        : {PRESET} (from the file)" in capsys.readouterr().out
    before, after = read_checkpoint(synth).meta, read_checkpoint(out).meta
    for key in ("preset", "classes", "palette", "mean", "std", "config", "model_cfg"):
        assert after[key] == before[key], key
    src, dst = Predictor(synth, device="cpu"), Predictor(out, device="cpu")
    assert dst.base_size == src.base_size == (96, 48) and dst.crop == (40, 40)
    rgb = np.asarray(Image.open(image).convert("RGB"))
    assert np.array_equal(src(rgb), dst(rgb))
    # --preset names the preset to attach: its settings, not the run's
    assert main(["convert", str(synth), str(out), "--preset", PRESET, "--force"]) == 0
    meta = read_checkpoint(out).meta
    assert meta["preset"] == PRESET and "config" not in meta


# ------------------------------------------------------------------------------------------ incomplete files
@pytest.mark.parametrize(
    ("load", "key", "ours"),
    [
        (_mmseg_state_dict, "decode_head.conv_seg.weight", "head.cls.conv.weight"),
        (_mmseg_state_dict, "decode_head.pam_in_conv.conv.weight", "head.pam_in.conv.weight"),
        (_ssseg_state_dict, "decoder_pamcam.1.weight", "head.cls.conv.weight"),
    ],
    ids=["mmseg-classifier", "mmseg-pam-in", "ssseg-classifier"],
)
def test_incomplete_toolbox_file_names_its_own_key(load, key, ours, tmp_path, capsys):
    sd = load()
    del sd[key]
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(DanetError, match="incomplete DANet checkpoint") as e:
        load_model(path)
    assert key in one_line(e) and ours not in str(e.value)
    assert key in cli_error(capsys, "convert", path, tmp_path / "o.pth")


def test_weights_that_do_not_fit_are_named_as_the_file_spells_them(tmp_path):
    sd = _mmseg_state_dict()
    sd["decode_head.cam_out_conv.conv.weight"] = sd["decode_head.cam_out_conv.conv.weight"][:, :-1]
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(DanetError, match="shape mismatches .*decode_head.cam_out_conv.conv.weight") as e:
        load_model(path)
    one_line(e)


# ------------------------------------------------------------------------------------------ verify_archive
def _flip_a_bit_in(path: Path, entry_suffix: str, at: int = 100) -> None:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + at] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_archive_finds_a_flipped_bit(synth, tmp_path):
    assert verify_archive(synth) == synth
    path = tmp_path / "flipped.pth"
    path.write_bytes(synth.read_bytes())
    with zipfile.ZipFile(path) as archive:
        biggest = max(archive.infolist(), key=lambda i: i.file_size).filename
    _flip_a_bit_in(path, biggest)
    read_checkpoint(path)  # torch.load does not check the CRCs: the damage loads silently
    with pytest.raises(DanetError, match=f"Bad CRC-32 for file '{biggest}'") as e:
        verify_archive(path)
    assert "flipped.pth" in one_line(e) and "download or save it again" in str(e.value)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(synth.read_bytes()[:5000])
    with pytest.raises(DanetError, match="truncated or corrupt"):
        verify_archive(truncated)


def test_verify_archive_accepts_files_without_checksums(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert verify_archive(legacy) == legacy
    unchecked = tmp_path / "nocrc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(3)}, unchecked)
    finally:
        torch.serialization.set_crc32_options(True)
    assert verify_archive(unchecked) == unchecked
    with pytest.raises(DanetError, match="not found"):
        verify_archive(tmp_path / "missing.pth")


def test_a_long_library_message_is_cut_between_sentences():
    """A truncated checkpoint's reason read '... If you are seeing this error, there is a high); download or save it
    again': a long first line keeps the sentences that fit, a line with none gets '...'."""
    from danet.safe_load import first_line

    miniz = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                         "internal miniz error. If you are seeing this error, there is a high likelihood that your "
                         "checkpoint file is corrupted.\nmore")  # fmt: skip
    assert first_line(miniz) == ("PytorchStreamReader failed reading zip archive: failed finding central directory. "
                                 "This is an internal miniz error.")  # fmt: skip
    assert first_line(RuntimeError("x" * 300)) == "x" * 157 + "..."
    assert first_line(RuntimeError("short.\nsecond")) == "short." and first_line(RuntimeError("")) == "RuntimeError"


def test_convert_refuses_an_existing_destination_and_keeps_a_toolbox_origin(tmp_path, capsys):
    """convert wrote over any existing DST, a text file too ('wrote notes.txt'): refused without --force. A file
    converted from mmsegmentation and converted again (with a preset, as the first conversion's output suggests)
    recorded the origin 'danet', and danet test / predict then resized and merged as sssegmentation does."""
    from danet.cli import main
    from danet.engine.evaluate import default_resize, default_tta

    mmseg = Path(__file__).parent / "fixtures" / "models" / "mmseg_d16.pth"
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    line = cli_error(capsys, "convert", mmseg, notes)
    assert line.endswith(f"destination {notes} exists; give another file name, or add --force to replace it")
    assert notes.read_text() == "precious"
    once, twice = tmp_path / "once.pth", tmp_path / "twice.pth"
    assert main(["convert", str(mmseg), str(once)]) == 0
    assert main(["convert", str(once), str(twice)]) == 0
    for path in (once, twice):
        ck = read_checkpoint(path)
        assert ck.meta["source"] == {"format": "mmseg", "file": "mmseg_d16.pth"}
        assert (default_resize(ck), default_tta(ck)) == ("twice", ("original", "probs"))


def test_create_model_refuses_structure_options_that_contradict_the_checkpoint(tmp_path):
    """head_channels=64, key_channels, aux=False, stem='single' beside a checkpoint of other ones were dropped in
    silence (a contradicting depth or class count was already an error); the checkpoint's own values are fine."""
    import danet
    from test_faults_common import saved_tiny_checkpoint

    ck = saved_tiny_checkpoint(tmp_path)
    own = danet.create_model(PRESET, checkpoint=ck).cfg
    for key, value in (("head_channels", 64), ("key_channels", 4), ("aux", False), ("stem", "single")):
        with pytest.raises(DanetError, match=rf"has {key}=.*, but {key}={value!r} was asked for; leave {key} out"):
            danet.create_model(PRESET, checkpoint=ck, **{key: value})
    assert danet.create_model(PRESET, checkpoint=ck, head_channels=own.head_channels, dropout=0.0).cfg.dropout == 0.0


def test_a_negative_batch_norm_variance_is_refused(tmp_path):
    """It loaded (and converted), and every logit came out NaN; NaN and inf weights were refused already."""
    from test_faults_common import saved_tiny_checkpoint

    path = saved_tiny_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    key = next(k for k in raw["model"] if k.endswith("running_var"))
    raw["model"][key][0] = -0.5
    torch.save(raw, path)
    with pytest.raises(DanetError, match=r"negative batch-norm variance in .*running_var; the file is damaged") as e:
        load_model(path)
    one_line(e)


def test_create_model_takes_numpy_scalars_as_python_numbers():
    """num_classes=np.int64(5) was refused ('must be a positive integer, got np.int64(5)'), dropout=np.float32 too."""
    import danet

    cfg = danet.create_model(PRESET, num_classes=np.int64(7), dropout=np.float32(0.25), aux=np.bool_(False)).cfg
    assert (cfg.num_classes, cfg.dropout, cfg.aux) == (7, 0.25, False)
    assert type(cfg.num_classes) is int and type(cfg.aux) is bool
    for bad in (np.float64(7.5), np.array([7])):
        with pytest.raises(DanetError, match="num_classes must be a positive integer"):
            danet.create_model(PRESET, num_classes=bad)


def test_the_api_s_wrong_argument_types_are_one_danet_error():
    """checkpoint=5, backbone_weights=3, Predictor(None) raised TypeError (expected str, bytes or os.PathLike), a
    norm_layer string one too; backbone_weights='imagenet', danet train's keyword, read 'checkpoint imagenet not
    found'."""
    import danet

    for kw, message in (({"checkpoint": 5}, "a checkpoint is a file path (str or pathlib.Path), got int 5"),
                        ({"backbone_weights": 3}, "got int 3"),
                        ({"backbone_weights": "imagenet"}, "danet train's download of the preset's ImageNet weights"),
                        ({"norm_layer": "bn"}, "norm_layer must be a module class")):  # fmt: skip
        with pytest.raises(DanetError, match=re.escape(message)):
            danet.create_model(PRESET, **kw)
    with pytest.raises(DanetError, match="got NoneType None"):
        danet.Predictor(None)
