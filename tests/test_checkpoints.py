"""Checkpoints: our format, atomic writes, foreign formats, safe loading, structure inference, backbones, convert."""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import danet
from danet import checkpoints as C
from danet.cli import main as cli_main
from danet.models.danet import DANet, ModelConfig
from danet.models.resnet import ResNet

FIXTURES = Path(__file__).parent / "fixtures" / "models"
TINY = ModelConfig(num_classes=5, depth=50, base_channels=4, stem_channels=8, head_channels=32, key_channels=16,
                   aux_channels=16)  # fmt: skip


def tiny(**kw) -> DANet:
    torch.manual_seed(0)
    model = DANet(TINY.replace(**kw))
    with torch.no_grad():
        model.head.pam.gamma.fill_(0.5)
        model.head.cam.gamma.fill_(0.3)
    return model.eval()


def same_output(a: DANet, b: DANet) -> bool:
    x = torch.randn(1, 3, 35, 41)
    with torch.no_grad():
        return torch.equal(a.eval()(x)["out"], b.eval()(x)["out"])


# ---------------------------------------------------------------------------------------------------------------
# our format
# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_our_format(tmp_path):
    model = tiny(output_stride=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    sum(v.mean() for v in model(torch.randn(2, 3, 33, 33)).values()).backward()
    opt.step()
    path = C.save_checkpoint(
        tmp_path / "sub" / "m.pth",
        model,
        "danet_tiny_synthetic",
        train_state={"epoch": 3, "iteration": 120, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
        extra_meta={"note": "hi"},
    )
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["format"] == "danet" and raw["version"] == 1
    assert raw["meta"]["preset"] == "danet_tiny_synthetic" and raw["meta"]["note"] == "hi"
    assert raw["meta"]["classes"] == list(danet.get_preset("danet_tiny_synthetic").classes)
    assert raw["meta"]["mean"] == [123.675, 116.28, 103.53] and raw["meta"]["layout"] == "custom"
    ck = C.read_checkpoint(path)
    assert ck.source == "danet" and ck.train_state["epoch"] == 3
    assert ck.train_state["optimizer"]["state"]  # momentum buffers kept
    loaded = C.load_model(path)  # structure from the weights, output stride from the meta
    assert loaded.cfg == model.cfg and not loaded.training
    assert same_output(model, loaded)
    assert not list(tmp_path.glob("sub/.*tmp*"))


def test_save_unwraps_wrappers_and_refuses_unstorable_state(tmp_path):
    model = tiny()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like
    C.save_checkpoint(tmp_path / "w.pth", wrapper)
    assert all(not k.startswith("module.") for k in torch.load(tmp_path / "w.pth", weights_only=True)["model"])
    with pytest.raises(TypeError, match="cannot be stored"):
        C.save_checkpoint(tmp_path / "bad.pth", model, train_state={"f": object()})


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    C.save_checkpoint(path, tiny())
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(danet.DanetError, match="No space left on device") as e:
        C.save_checkpoint(path, tiny(num_classes=3))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


# ---------------------------------------------------------------------------------------------------------------
# foreign formats (real files written by the toolboxes: tests/fixtures/models)
# ---------------------------------------------------------------------------------------------------------------
def test_ssseg_trainer_file():
    raw = torch.load(FIXTURES / "ssseg_d8.pth", weights_only=True)
    assert {"cur_epoch", "cur_iter", "optimizer", "model"} <= set(raw)
    ck = C.read_checkpoint(FIXTURES / "ssseg_d8.pth")
    assert ck.source == "ssseg" and ck.train_state is None
    assert len(ck.state_dict) == len(raw["model"]) == 373
    assert ck.state_dict["head.pam.gamma"].shape == ()
    found = C.infer_config(ck.state_dict)
    assert found == dict(num_classes=5, depth=50, stem="deep", stem_channels=8, base_channels=4, head_channels=32,
                         key_channels=16, pam_bias=False, aux=True, aux_channels=32)  # fmt: skip


def test_mmseg_1x_file_with_mmengine_objects_is_read_without_unpickling_them():
    path = FIXTURES / "mmseg_d8.pth"  # saved like mmengine's Runner: message_hub holds HistoryBuffer objects
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    ck = C.read_checkpoint(path)
    assert ck.source == "mmseg" and len(ck.state_dict) == 376
    assert ck.meta["classes"] == [f"class{i}" for i in range(5)] and len(ck.meta["palette"]) == 5
    torch.save(ck.meta, Path(os.devnull))  # meta was made plain
    model = C.load_model(ck, ModelConfig(num_classes=5))
    assert model.cfg.layout == "custom" and model.cfg.pam_bias and model.cfg.aux_channels == 16


def test_mmseg_0x_layout_with_ddp_prefix(tmp_path):
    sd = torch.load(FIXTURES / "mmseg_d16.pth", weights_only=True)["state_dict"]
    names = tuple(f"c{i}" for i in range(5))
    meta = {"CLASSES": names, "PALETTE": [[i, i, i] for i in range(5)], "mmcv_version": "1.7.1"}
    old = {"meta": meta, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"state": {}}}
    torch.save(old, tmp_path / "iter_80000.pth")
    ck = C.read_checkpoint(tmp_path / "iter_80000.pth")
    assert ck.source == "mmseg" and ck.meta["classes"] == list(names)
    cfg = ModelConfig(num_classes=5, output_stride=16)
    assert same_output(C.load_model(ck, cfg), C.load_model(FIXTURES / "mmseg_d16.pth", cfg))


def test_create_model_takes_widths_and_layout_from_the_file():
    model = danet.create_model("danet_r50-d16_ade20k", num_classes=5, checkpoint=FIXTURES / "mmseg_d16.pth")
    assert model.cfg.output_stride == 16 and model.cfg.pam_bias and model.cfg.head_channels == 32


def test_ddp_prefix_and_bare_state_dicts(tmp_path):
    model = tiny()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    ck = C.read_checkpoint(tmp_path / "ddp.pth")
    assert ck.source == "danet"
    assert same_output(model, C.load_model(ck))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cfg": danet.get_preset("danet_r50-d8_ade20k").model},
         "has 5 classes but preset danet_r50-d8_ade20k has 150; pass num_classes=5"),
        ({"cfg": TINY.replace(num_classes=19)}, "has 5 classes but the requested model has 19; pass num_classes=5$"),
        ({"cfg": TINY.replace(depth=101)}, "ResNet-50 DANet but the requested model is ResNet-101"),
        ({"explicit_num_classes": 7}, "has 5 classes but num_classes=7 was asked for"),
    ],
)  # fmt: skip
def test_conflicts_with_the_request_raise_one_error(kwargs, match):
    with pytest.raises(danet.DanetError, match=match) as e:
        C.load_model(FIXTURES / "ssseg_d16.pth", **kwargs)
    assert "ssseg_d16.pth" in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = tiny().state_dict()
    del sd["backbone.layer2.1.conv1.weight"]
    sd["head.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(danet.DanetError) as e:
        C.load_model(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "1 missing keys" in msg and "backbone.layer2.1.conv1.weight" in msg
    assert "1 unexpected keys" in msg and "head.extra.weight" in msg


# ---------------------------------------------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------------------------------------------
class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilOpen:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_code_is_never_executed(tmp_path):
    m1, m2, m3 = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    sd = tiny().state_dict()
    torch.save({"state_dict": sd, "meta": {"a": Evil(m1), "b": [EvilOpen(m2)]}}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pth", weights_only=True)
    ck = C.read_checkpoint(tmp_path / "evil.pth")  # the restricted reader: tensors back, code inert
    assert not m1.exists() and not m2.exists()
    assert set(ck.state_dict) == set(sd) and torch.equal(
        ck.state_dict["head.cls.conv.weight"], sd["head.cls.conv.weight"]
    )
    assert "not loaded: posix.system" in ck.meta["a"] or "not loaded: nt.system" in ck.meta["a"]
    # a plain pickle (not torch's format) and a file whose top object is the payload
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(m3)))
    with pytest.raises(danet.DanetError, match="not a PyTorch checkpoint"):
        C.read_checkpoint(tmp_path / "evil.pkl")
    torch.save(Evil(m3), tmp_path / "top.pth")
    with pytest.raises(danet.DanetError, match="not a state dict"):
        C.read_checkpoint(tmp_path / "top.pth")
    assert not m3.exists()


def test_unreadable_files_give_one_line_errors(tmp_path):
    with pytest.raises(danet.DanetError, match="not found"):
        C.read_checkpoint(tmp_path / "nope.pth")
    good = C.save_checkpoint(tmp_path / "good.pth", tiny())
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("hello\n")
    for name, match in (("cut.pth", "truncated or corrupt"), ("notes.txt", "not a PyTorch checkpoint")):
        with pytest.raises(danet.DanetError, match=match) as e:
            C.read_checkpoint(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("x.txt", "not torch")
    with pytest.raises(danet.DanetError, match="truncated or corrupt"):
        C.read_checkpoint(tmp_path / "other.zip")


# ---------------------------------------------------------------------------------------------------------------
# ImageNet backbones
# ---------------------------------------------------------------------------------------------------------------
def backbone_sd(stem: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    sd = ResNet(50, 8, stem, base_channels=4, stem_channels=8).state_dict()
    return {**sd, "fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10)}


def test_load_backbone_mmseg_v1c_and_torchvision(tmp_path):
    v1c = backbone_sd("deep")
    torch.save({"meta": {}, "state_dict": {f"backbone.{k}": v for k, v in v1c.items()}}, tmp_path / "v1c.pth")
    model = danet.create_model("danet_r50-d8_ade20k", num_classes=5, **_narrow(), backbone_weights=tmp_path / "v1c.pth")
    assert torch.equal(model.backbone.layer4[2].conv3.weight, v1c["layer4.2.conv3.weight"])
    assert C.read_checkpoint(tmp_path / "v1c.pth").source == "imagenet"

    tv = backbone_sd("single")
    torch.save(tv, tmp_path / "tv.pth")
    with pytest.raises(danet.DanetError, match='stem="single"'):
        C.load_backbone(DANet(TINY), tmp_path / "tv.pth")
    model = C.load_backbone(DANet(TINY.replace(stem="single")), tmp_path / "tv.pth")
    assert torch.equal(model.backbone.conv1.weight, tv["conv1.weight"])

    del v1c["layer3.5.conv2.weight"]
    torch.save(v1c, tmp_path / "partial.pth")
    with pytest.raises(danet.DanetError, match="missing keys.*layer3.5.conv2.weight"):
        C.load_backbone(DANet(TINY), tmp_path / "partial.pth")


def _narrow() -> dict:
    return {k: getattr(TINY, k) for k in ("base_channels", "stem_channels", "head_channels", "key_channels")}


# ---------------------------------------------------------------------------------------------------------------
# danet convert
# ---------------------------------------------------------------------------------------------------------------
def test_convert_cli(tmp_path, capsys):
    dst = tmp_path / "out" / "converted.pth"
    assert cli_main(["convert", str(FIXTURES / "mmseg_d16.pth"), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "source format : mmseg" in out and "5 classes" in out and "ResNet-50" in out
    assert "output stride 16 (from the file's mmseg config)" in out
    raw = torch.load(dst, weights_only=True)
    assert raw["meta"]["source"] == {"format": "mmseg", "file": "mmseg_d16.pth"}
    assert raw["meta"]["model_cfg"]["pam_bias"] is True and raw["meta"]["model_cfg"]["output_stride"] == 16
    original = C.load_model(FIXTURES / "mmseg_d16.pth", ModelConfig(num_classes=5, output_stride=16))
    assert same_output(original, C.load_model(dst))

    assert cli_main(["convert", str(FIXTURES / "ssseg_d8.pth"), str(dst), "--preset", "danet_r50-d8_ade20k"]) == 2
    assert "destination" in capsys.readouterr().err and same_output(original, C.load_model(dst))  # kept
    argv = ["convert", str(FIXTURES / "ssseg_d8.pth"), str(dst), "--preset", "danet_r50-d8_ade20k", "--force"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "has 5 classes but preset danet_r50-d8_ade20k has 150" in err and len(err.strip().splitlines()) == 1
