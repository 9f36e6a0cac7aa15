"""Fault injection, found by an audit: checkpoints that are well-formed files but not usable DANet weights.

- A segmentation model of another architecture in mmsegmentation layout (a ResNet and `decode_head.conv_seg`, no
  attention head: an FCN / PSPNet file), a DANet file with a required weight missing or flattened, and files of our
  format whose "model" / "meta" / "train_state" entries are missing or of the wrong type: one line saying what is
  wrong, from the API and from `danet convert / predict / test` (before: KeyError / TypeError / IndexError).
- NaN / inf weights or buffers: refused when a model is loaded (before: `danet test` printed a meaningless mIoU).
- A folder given as the checkpoint: "is a directory", naming a checkpoint inside it (before: "not found").
- A class-count mismatch tells command-line users what to do too (no CLI command takes num_classes=).
- A meta whose model_cfg is damaged: one line (before: TypeError from ModelConfig).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import danet
from danet.checkpoints import load_model, read_checkpoint, save_checkpoint
from danet.errors import DanetError
from test_faults_common import cli_error, one_line, tiny_folder_dataset, tiny_model

PRESET = "danet_tiny_synthetic"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "good.pth"
    save_checkpoint(path, tiny_model(), PRESET)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_folder_dataset(tmp_path_factory.mktemp("data"))


def _cli_errors(capsys, path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    """The one-line errors of `danet convert / predict / test` given `path` as the checkpoint (each must fail)."""
    image = data_root / "images" / "validation" / "a.png"
    out = tmp_path / "converted.pth"
    lines = [
        cli_error(capsys, "convert", path, out),
        cli_error(capsys, "predict", "--checkpoint", path, image, "--out", tmp_path / "pred"),
        cli_error(capsys, "test", PRESET, "--checkpoint", path, "--data-root", data_root, "--no-progress"),
    ]
    assert not out.exists() and not (tmp_path / "pred").exists()
    return lines


# ------------------------------------------------------------------------------------------ not a (whole) DANet
def _mmseg_fcn(tmp_path: Path) -> Path:
    """An mmseg FCN-like file: the synthetic preset's ResNet, `decode_head.convs` + `conv_seg`, an auxiliary head."""
    sd = {k: v for k, v in tiny_model().state_dict().items() if k.startswith("backbone.")}
    width = sd["backbone.layer4.0.conv3.weight"].shape[0]
    sd.update({
        "decode_head.convs.0.conv.weight": torch.randn(16, width, 3, 3),
        "decode_head.conv_seg.weight": torch.randn(5, 16, 1, 1),
        "decode_head.conv_seg.bias": torch.zeros(5),
        "auxiliary_head.conv_seg.weight": torch.randn(5, 16, 1, 1),
    })  # fmt: skip
    path = tmp_path / "fcn_r50-d8_synthetic.pth"
    torch.save({"meta": {"CLASSES": list(danet.get_preset(PRESET).classes)}, "state_dict": sd}, path)
    return path


def test_other_architecture_in_mmseg_layout(tmp_path, tiny_data, capsys):
    path = _mmseg_fcn(tmp_path)
    assert read_checkpoint(path).source == "mmseg"  # read as what it is; refused as a DANet
    with pytest.raises(DanetError, match="is not a DANet checkpoint") as e:
        load_model(path)
    assert "head.pam" in one_line(e) and "mmsegmentation" in str(e.value)
    with pytest.raises(DanetError, match="is not a DANet checkpoint"):
        danet.create_model(PRESET, checkpoint=path)
    for line in _cli_errors(capsys, path, tmp_path, tiny_data):
        assert "is not a DANet checkpoint" in line and path.name in line
    # its ResNet is still good to start a model from, as the message says
    model = danet.create_model(PRESET, backbone_weights=path)
    assert torch.equal(
        model.backbone.layer1[0].conv1.weight, torch.load(path)["state_dict"]["backbone.layer1.0.conv1.weight"]
    )


@pytest.mark.parametrize("key", ["head.pam_in.conv.weight", "head.pam.query_project.weight", "head.cls.conv.weight"])
def test_danet_file_without_a_weight_the_structure_is_read_from(key, good, tmp_path, tiny_data, capsys):
    obj = torch.load(good, weights_only=True)
    del obj["model"][key]
    path = tmp_path / "incomplete.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="incomplete DANet checkpoint") as e:
        load_model(path)
    assert key in one_line(e)
    for line in _cli_errors(capsys, path, tmp_path, tiny_data):
        assert key in line


def test_flattened_conv_weight(good, tmp_path):
    obj = torch.load(good, weights_only=True)
    obj["model"]["head.pam_in.conv.weight"] = torch.tensor(1.0)
    path = tmp_path / "flat.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="head.pam_in.conv.weight has shape \\(\\), not a convolution") as e:
        load_model(path)
    one_line(e)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o: o.pop("model"), 'without its "model" entry'),
        (lambda o: o.update(model=list(o["model"].values())), '"model" entry .* is a list'),
        (lambda o: o.update(model={}), '"model" entry .* is empty'),
        (lambda o: o["model"].update({"head.cls.conv.bias": [0.0] * 5}), "'head.cls.conv.bias' is a list"),
        (lambda o: o.update(meta=[1, 2]), '"meta" entry is a list, not a dict'),
        (lambda o: o.update(train_state=["epoch", 3]), '"train_state" entry is a list, not a dict'),
    ],
    ids=["no-model", "model-list", "model-empty", "weight-list", "meta-list", "train-state-list"],
)  # fmt: skip
def test_our_format_with_damaged_entries(change, match, good, tmp_path, tiny_data, capsys):
    obj = torch.load(good, weights_only=True)
    change(obj)
    path = tmp_path / "damaged.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match=match) as e:
        read_checkpoint(path)
    assert "damaged.pth" in one_line(e)
    for line in _cli_errors(capsys, path, tmp_path, tiny_data):
        assert "damaged.pth" in line


def test_damaged_model_cfg_in_meta(good, tmp_path, capsys):
    obj = torch.load(good, weights_only=True)
    obj["meta"]["model_cfg"] = {"output_stride": 7, "dropout": "x"}  # no num_classes, an unknown stride
    path = tmp_path / "badcfg.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="invalid model_cfg .*output_stride must be one of .*got 7") as e:
        load_model(path)
    one_line(e)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert "--preset" in cli_error(capsys, "predict", "--checkpoint", path, image, "--out", tmp_path / "pred")
    # with the preset named, the file's weights are good: they load, at the preset's output stride
    preset = danet.get_preset(PRESET)
    with pytest.warns(UserWarning, match="saved with output_stride=7"):
        assert load_model(path, preset.model).cfg.output_stride == preset.model.output_stride


# ------------------------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize(
    ("key", "value"),
    [("head.cls.conv.weight", float("nan")), ("backbone.layer2.0.bn1.running_var", float("inf"))],
    ids=["nan-weight", "inf-buffer"],
)
def test_non_finite_weights_are_refused(key, value, good, tmp_path, tiny_data, capsys):
    from danet.cli import main

    assert main(["test", PRESET, "--checkpoint", str(good), "--data-root", str(tiny_data), "--no-progress"]) == 0
    capsys.readouterr()  # control: the good file evaluates on this data
    obj = torch.load(good, weights_only=True)
    obj["model"][key].view(-1)[0] = value
    path = tmp_path / "diverged.pth"
    torch.save(obj, path)
    with pytest.raises(DanetError, match="non-finite") as e:
        load_model(path)
    assert key in one_line(e)
    with pytest.raises(DanetError, match="non-finite"):
        danet.create_model(PRESET, checkpoint=path)
    for line in _cli_errors(capsys, path, tmp_path, tiny_data):
        assert "non-finite" in line and key in line and "diverged.pth" in line


# ------------------------------------------------------------------------------------------------- a folder
def test_folder_given_as_checkpoint(good, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes(good.read_bytes())
    (run / "epoch_1.pth").write_bytes(good.read_bytes())
    with pytest.raises(DanetError, match="is a directory") as e:
        read_checkpoint(run)
    assert str(run / "best.pth") in one_line(e)  # the file to pass instead
    with pytest.raises(DanetError, match="is a directory; pass a checkpoint file \\(a .pth file"):
        read_checkpoint(tmp_path / "run" / "..")  # a folder without checkpoints directly in it
    for argv in (["convert", run, tmp_path / "out.pth"], ["export", run, "--onnx", tmp_path / "m.onnx"]):
        line = cli_error(capsys, *argv)
        assert "is a directory" in line and "best.pth" in line


# ---------------------------------------------------------------------------------------- class-count mismatch
def test_class_count_mismatch_helps_cli_users(tmp_path, capsys):
    path = tmp_path / "nine.pth"
    save_checkpoint(path, tiny_model(num_classes=9), None)
    with pytest.raises(
        DanetError, match="has 9 classes but preset danet_tiny_synthetic has 5; pass num_classes=9"
    ) as e:
        danet.create_model(PRESET, checkpoint=path)
    assert one_line(e).endswith("pass num_classes=9")  # the Python API's remedy only: no preset has 9 classes
    line = cli_error(capsys, "convert", path, tmp_path / "out.pth", "--preset", PRESET)
    assert line.endswith(
        "9 classes but preset danet_tiny_synthetic has 5; leave out --preset (the file decides the structure)"
    )
    # a preset of that class count and depth exists: it is named
    five = tmp_path / "five.pth"
    save_checkpoint(five, tiny_model(), PRESET)
    with pytest.raises(DanetError, match="pass num_classes=5, or name a 5-class preset such as danet_tiny_synthetic"):
        load_model(five, danet.get_preset(PRESET).model.replace(num_classes=7))


def test_class_count_advice_names_only_what_the_caller_has(tmp_path, capsys):
    """Each command's advice names its own options: danet test has no --preset, Predictor no num_classes."""
    path = tmp_path / "nine.pth"
    save_checkpoint(path, tiny_model(num_classes=9), None)
    line = cli_error(capsys, "test", PRESET, "--checkpoint", path, "--data-root", tmp_path, "--no-progress")
    assert line.endswith("no ResNet-26 preset has 9 classes: test it on data of its classes (--dataset folder)")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    line = cli_error(capsys, "predict", "--checkpoint", path, "--preset", PRESET, photo, "--out", tmp_path / "o")
    assert line.endswith("leave out --preset / preset_name= (the file decides the structure)")
    with pytest.raises(DanetError) as e:
        danet.Predictor(path, preset_name=PRESET)
    assert "num_classes" not in one_line(e) and "preset_name=" in one_line(e)
    line = cli_error(capsys, "export", path, "--onnx", tmp_path / "m.onnx", "--preset", PRESET)
    assert line.endswith("leave out --preset (the file decides the structure)")
    five = tmp_path / "five.pth"  # a preset of the file's class count and depth exists: danet test names it
    save_checkpoint(five, tiny_model(), PRESET)
    with pytest.raises(
        DanetError,
        match="has 5 classes but the requested model has 7; test it with a 5-class preset "
        "such as danet_tiny_synthetic$",
    ):
        load_model(five, danet.get_preset(PRESET).model.replace(num_classes=7), remedy="test")
