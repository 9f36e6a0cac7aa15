"""`danet export`: ONNX (checked with onnxruntime) and torch.export programs with dynamic batch, height and width."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import danet
from danet import export
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.errors import DanetError
from test_faults_common import cli_error, digest, tiny_model

PRESET = "danet_tiny_synthetic"
SIZES = [(1, 40, 72), (3, 88, 56), (2, 57, 33)]  # (batch, H, W), none of them the export's (1, 64, 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():  # livelier weights than the init: logits of order 1, BN statistics not the identity
        for name, p in model.named_parameters():
            if "gamma" not in name:
                p.add_(torch.randn_like(p) * p.std().nan_to_num(0.1) * 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("export") / "model.pth"
    save_checkpoint(path, model, PRESET)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return danet.create_model(PRESET, checkpoint=checkpoint).eval()


def test_onnx_dynamic_sizes_match_pytorch(checkpoint, reference, tmp_path, capsys):
    out = tmp_path / "danet.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(out), "--size", "64", "64"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime check" in printed and "max abs difference" in printed
    assert "did not export" not in printed  # the fused attention (SDPA, scale=1) exported as it is
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for b, h, w in SIZES:
        x = torch.randn(b, 3, h, w)
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = reference(x)["out"].numpy()
        assert got.shape == (b, 5, h, w)
        assert np.abs(ref).max() > 0.1  # a test of something
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["danet.preset"] == PRESET
    assert json.loads(meta["danet.classes"]) == list(danet.get_preset(PRESET).classes)
    assert json.loads(meta["danet.mean"]) == pytest.approx(danet.get_preset(PRESET).mean)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_onnx_explicit_attention_path(reference, tmp_path):
    """The explicit softmax(QK^T)V path exports too, to the same numbers."""
    model = danet.create_model(PRESET, fused_attention=False)
    model.load_state_dict(reference.state_dict())
    diff = export.export_onnx(model, tmp_path / "explicit.onnx", size=(48, 48), log=lambda s: None)
    assert diff is not None and diff < 1e-4


def test_onnx_falls_back_to_explicit_attention(reference, tmp_path, monkeypatch):
    """If the exporter cannot handle the fused attention, the explicit path is exported (same result)."""
    real = torch.onnx.export
    seen = []

    def picky_export(module, *args, **kwargs):
        seen.append(module.model.head.pam.fused)
        if module.model.head.pam.fused:
            raise RuntimeError("Unsupported: aten::scaled_dot_product_attention")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", picky_export)
    model = danet.create_model(PRESET)
    model.load_state_dict(reference.state_dict())
    logs: list[str] = []
    diff = export.export_onnx(model, tmp_path / "m.onnx", size=(48, 48), log=logs.append)
    assert seen == [True, False]
    assert any("explicit attention" in line for line in logs)
    assert diff < 1e-4


def test_torch_export_dynamic_sizes(checkpoint, reference, tmp_path, capsys):
    out = tmp_path / "danet.pt2"
    assert main(["export", str(checkpoint), "--torch-export", str(out), "--size", "64", "64"]) == 0
    assert "torch.export check" in capsys.readouterr().out
    program = torch.export.load(str(out)).module()
    for b, h, w in SIZES[:2]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program(x), reference(x)["out"], atol=1e-5, rtol=1e-5)


def test_failed_check_keeps_previous_export(checkpoint, tmp_path, monkeypatch, capsys):
    """A file that fails the onnxruntime check is not put in place; the previous export keeps its bytes."""
    out = tmp_path / "danet.onnx"
    out.write_bytes(b"previous export")
    before = digest(out)
    monkeypatch.setattr(export, "_tolerance", lambda ref: -1.0)  # every difference is too large
    line = cli_error(capsys, "export", checkpoint, "--onnx", out, "--size", "32", "32")
    assert "check failed" in line
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["danet.onnx"]


def test_failed_rename_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "danet.onnx"
    out.write_bytes(b"previous export")
    before = digest(out)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.os, "replace", full_disk)
    line = cli_error(capsys, "export", checkpoint, "--onnx", out, "--size", "32", "32", "--no-verify")
    assert "No space left" in line
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["danet.onnx"]


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "export", checkpoint, "--onnx", tmp_path / "no" / "m.onnx")
    assert "is a folder" in cli_error(capsys, "export", checkpoint, "--onnx", tmp_path)
    assert "nothing to export" in cli_error(capsys, "export", checkpoint)
    assert "opset" in cli_error(capsys, "export", checkpoint, "--onnx", tmp_path / "m.onnx", "--opset", "11")
    assert "too small" in cli_error(capsys, "export", checkpoint, "--onnx", tmp_path / "m.onnx", "--size", "8", "8")
    assert "unknown preset" in cli_error(
        capsys, "export", checkpoint, "--onnx", tmp_path / "m.onnx", "--preset", "danet_r50_nope"
    )
    assert "newer than this PyTorch exports" in cli_error(capsys, "export", checkpoint, "--onnx", tmp_path / "m.onnx",
                                                           "--opset", "99")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_export_never_writes_over_its_checkpoint_or_its_other_output(checkpoint, tmp_path, capsys):
    import shutil

    ck = Path(shutil.copy(checkpoint, tmp_path / "best.pth"))
    before = digest(ck)
    for flag in ("--onnx", "--torch-export"):
        assert "is the checkpoint being exported" in cli_error(capsys, "export", ck, flag, ck)
    assert "both name" in cli_error(capsys, "export", ck, "--onnx", tmp_path / "m", "--torch-export", tmp_path / "m")
    assert digest(ck) == before and sorted(f.name for f in tmp_path.iterdir()) == ["best.pth"]


def test_export_of_a_file_without_a_preset_guesses_it_or_says_so(tmp_path, capsys):
    """A bare state dict records no preset: its sssegmentation file name gives it (output stride 16 here, and the
    normalisation metadata); without one, a note says the export runs at output stride 8 without that metadata."""
    narrow = dict(base_channels=4, stem_channels=8, head_channels=16, key_channels=8, aux_channels=8)
    model = danet.create_model("danet_r50-d16_ade20k", **narrow)
    named = tmp_path / "danet_resnet50os16_ade20k_train.pth"
    torch.save(model.state_dict(), named)
    got, meta = export.load_for_export(named)
    assert got.cfg.output_stride == 16 and json.loads(meta["danet.mean"]) == list(danet.get_preset(PRESET).mean)
    assert "records no preset" not in capsys.readouterr().err
    plain = tmp_path / "weights.pth"
    torch.save(model.state_dict(), plain)
    got, meta = export.load_for_export(plain)
    assert "records no preset: exported at output stride 8" in capsys.readouterr().err
    assert got.cfg.output_stride == 8 and "danet.mean" not in meta


def test_export_function_refuses_unwritable(tmp_path):
    with pytest.raises(DanetError, match="does not exist"):
        export.export_onnx(tiny_model(), tmp_path / "missing" / "m.onnx", size=(32, 32))


def _readme_snippet() -> str:
    """The onnxruntime example of the README (or of its draft, docs/what_happens_when.md)."""
    repo = Path(__file__).resolve().parents[1]
    for doc in (repo / "README.md", repo / "docs" / "what_happens_when.md"):
        if doc.is_file():
            for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
                if "ort.InferenceSession" in block:
                    return block
    raise AssertionError("no onnxruntime example in README.md or docs/what_happens_when.md")


def test_readme_onnxruntime_example_runs(checkpoint, reference, tmp_path, monkeypatch, capsys):
    assert main(["export", str(checkpoint), "--onnx", str(tmp_path / "danet.onnx"), "--size", "48", "48"]) == 0
    rgb = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_snippet(), "README snippet", "exec"), namespace)
    labels = namespace["labels"]
    assert labels.shape == (45, 70)
    preset = danet.get_preset(PRESET)
    x = torch.from_numpy(np.asarray(Image.open("photo.jpg").convert("RGB"), np.float32)) - torch.tensor(preset.mean)
    x = (x / torch.tensor(preset.std)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = reference(x)["out"][0].argmax(0).numpy()
    assert (labels == expected).mean() > 0.999
    # a photo whose EXIF tag turns it (orientation 6: 90 degrees clockwise) is read turned, as danet reads it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    exec(compile(_readme_snippet(), "README snippet", "exec"), namespace)
    from danet.data.io import read_image

    assert namespace["labels"].shape == read_image(tmp_path / "photo.jpg").shape[:2] == (70, 45)


@pytest.mark.parametrize("kind", ["--onnx", "--torch-export"])
def test_export_to_a_name_that_is_not_utf8_or_is_very_long(checkpoint, tmp_path, capsys, kind):
    """The temporary file's name went to torch's C++ writers, which cannot take a name that is not valid UTF-8 (a
    22,000-line traceback; for .pt2 an abort), and a 250-byte name with the temporary's additions passed the file
    system's 255: the temporary takes a hash of such a name."""
    suffix = ".onnx" if kind == "--onnx" else ".pt2"
    for name in (os.fsdecode(b"caf\xe9") + suffix, "x" * (251 - len(suffix)) + suffix):
        out = tmp_path / name
        assert main(["export", str(checkpoint), kind, str(out), "--size", "32", "32", "--no-verify"]) == 0, name[:20]
        assert out.stat().st_size > 1000 and [p.name for p in tmp_path.iterdir()] == [name]
        out.unlink()
    capsys.readouterr()


def test_temporary_names_fit_and_keep_the_folder():
    from danet.files import NAME_MAX, temp_beside

    for name in ("a.png", "é" * 100 + ".png", "b" * 251 + ".png", os.fsdecode(b"\xff\xfe.png")):
        for keep in (False, True):
            tmp = temp_beside(Path("/x/y") / name, "tmp-", keep_suffix=keep)
            assert tmp.parent == Path("/x/y") and tmp.name.startswith(".") and tmp.name != name
            assert len(os.fsencode(tmp.name)) <= NAME_MAX and tmp.name.encode("utf-8")
            assert tmp.name.endswith(".png") == keep  # the suffix kept exactly where asked
    assert temp_beside(Path("a.png"), "tmp-") == Path(f".a.png.tmp-{os.getpid()}")  # short names read as before
