"""Run-level speed options give the plain result: `fused_loss_impl=compiled` in `danet train`, `conv=winograd` in
`danet train` (--set) and `danet test` / `danet predict` (--conv), `--norm triton` and `--channels-last` in `danet test`
/ `predict`.

Tiny: the synthetic preset at 32x32 crops, batch 2, 1-2 iterations (stopped mid-epoch: no validation), and a
random-init checkpoint (perturbed BN and attention gamma) evaluated on two 128x128 val images. Winograd only takes
convolutions of >= MIN_CHANNELS channels; the tests lower that so the tiny model's 3x3 convolutions switch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import danet.engine.fused_loss as L
import danet.engine.train as T
import danet.models.winograd as W
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.config import RunConfig, apply_overrides
from danet.data import ensure_synthetic
from danet.data.transforms import normalize
from danet.engine.logging import read_log
from danet.errors import DanetError
from danet.models.danet import DANet
from danet.presets import get_preset
from test_speed_options import perturb

PRESET = "danet_tiny_synthetic"
SETS = [
    "schedule.epochs=1",
    "schedule.iters_per_epoch=3",
    "schedule.batch_size=2",
    "data.crop_size=[32,32]",
    "data.num_workers=0",
    "deterministic=true",
    "device=cpu",
    "threads=1",
    "progress=false",
    "log_interval=1",
]
LOSS_KEYS = ("loss", "loss_out", "loss_pam", "loss_cam", "loss_aux")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture
def winograd_calls(monkeypatch) -> list[tuple[bool, int]]:
    """(enabled, convolutions switched) of every use_winograd call; every 3x3 conv of the tiny model is eligible."""
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    calls: list[tuple[bool, int]] = []
    real = W.use_winograd

    def spy(model, enabled=True):
        calls.append((enabled, real(model, enabled)))
        return calls[-1][1]

    monkeypatch.setattr(W, "use_winograd", spy)  # danet test / predict import it when they run
    monkeypatch.setattr(T, "use_winograd", spy)  # danet train imports it at module load
    return calls


def train_losses(root: Path, work: Path, *sets: str, iters: int = 2) -> list[dict]:
    cfg = apply_overrides(
        RunConfig(preset=PRESET, data_root=str(root), work_dir=str(work)), [*SETS, f"stop_iter={iters}", *sets]
    )
    summary = T.train(cfg)
    assert summary["iter"] == iters and summary["stopped"]
    return [r for r in read_log(work / "log.jsonl") if r["type"] == "train"]


def assert_same_losses(a: list[dict], b: list[dict], rtol: float) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for key in LOSS_KEYS:
            assert abs(ra[key] - rb[key]) <= rtol * abs(rb[key]), (ra["iter"], key, ra[key], rb[key])


def test_compiled_fused_loss_trains_like_chunked(data_root, tmp_path, monkeypatch):
    """Two steps: step 2's loss takes step 1's gradient (equal to rounding) and the forward, which is continuous.

    NOTE: not a third: step 2's gradient is not continuous in the weights (ReLU masks), and a mask flipped by a
    rounding difference in the weights moves it, through train-mode BN at 4x4 maps and batch 2, by a few per cent.
    """
    monkeypatch.setattr(L, "COMPILE_BACKEND", "eager")  # dynamo traces, runs eagerly: the formulation, in seconds
    monkeypatch.setattr(L, "_compiled", {})
    chunked = train_losses(data_root, tmp_path / "chunked", "fused_loss=true")
    assert not L._compiled
    compiled = train_losses(data_root, tmp_path / "compiled", "fused_loss=true", "fused_loss_impl=compiled")
    assert "eager" in L._compiled  # the compiled kernels ran
    assert len(chunked) == 2
    assert_same_losses(compiled, chunked, 1e-5)


def test_winograd_trains_like_direct(data_root, tmp_path, winograd_calls):
    """The first step's losses (same weights, same batch) agree to rounding.

    NOTE: not later steps: Winograd's float32 error (~3e-6 a conv, ~3e-5 after the tiny net's 25 convs) flips a few
    ReLUs near zero, and through train-mode BN at 4x4 maps and batch 2 that moves the gradient by a few per cent.
    """
    direct = train_losses(data_root, tmp_path / "direct", iters=1)
    assert winograd_calls == [(False, 0)]
    wino = train_losses(data_root, tmp_path / "winograd", "conv=winograd", iters=1)
    assert winograd_calls[1][0] is True and winograd_calls[1][1] > 10
    assert_same_losses(wino, direct, 1e-5)


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory) -> Path:
    """A random-init tiny DANet that predicts every class: perturbed BN and gamma, and a classifier centred on the
    features of a val image (a fresh init gives nearly constant features, so one class everywhere)."""
    preset = get_preset(PRESET)
    torch.manual_seed(0)
    model = perturb(DANet(preset.model).eval(), 1)
    with torch.no_grad():
        image = sorted((data_root / "images" / "validation").glob("*.jpg"))[0]
        x = normalize(np.array(Image.open(image).convert("RGB")), preset.mean, preset.std)[None]
        cls = model.head.cls.conv
        feats = []
        hook = cls.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
        model(x)
        hook.remove()
        cls.weight.mul_(20)
        cls.bias.copy_(-cls.weight[:, :, 0, 0] @ feats[0].mean((0, 2, 3)))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model, preset)


# NOTE: Winograd moves the logits by ~1e-6 (float32 rounding), which can flip the argmax of a pixel whose top two
# classes are that close (measured: 1 pixel in 50 val images); the checks below allow a few such pixels.
def test_test_cli_winograd_gives_the_same_metrics(data_root, checkpoint, tmp_path, winograd_calls):
    base = ["test", PRESET, "--checkpoint", str(checkpoint), "--data-root", str(data_root), "--limit", "2"]
    results = {}
    for conv in ("direct", "winograd"):
        out = tmp_path / f"{conv}.json"
        assert (
            main([*base, "--no-progress", "--conv", conv, "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
        )
        results[conv] = json.loads(out.read_text())
    assert [c[0] for c in winograd_calls] == [True] and winograd_calls[0][1] > 10  # direct: left alone
    direct, wino = results["direct"], results["winograd"]
    assert direct["settings"]["conv"] == "direct" and wino["settings"]["conv"] == "winograd"
    assert sum(iou > 0 for iou in direct["IoU"]) >= 3  # not a one-class model
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc"):
        assert wino[key] == pytest.approx(direct[key], abs=0.2, nan_ok=True), key


def test_predict_winograd_writes_the_same_labels(data_root, checkpoint, tmp_path, winograd_calls):
    images = sorted((data_root / "images" / "validation").glob("*.jpg"))[:2]
    labels = {}
    for conv in ("direct", "winograd"):
        out = tmp_path / conv
        argv = ["predict", "--checkpoint", str(checkpoint), *map(str, images), "--out", str(out), "--conv", conv]
        assert main(argv) == 0
        labels[conv] = [np.asarray(Image.open(out / f"{img.stem}.png")) for img in images]
    assert [c[0] for c in winograd_calls] == [True] and winograd_calls[0][1] > 10  # direct: left alone
    for a, b in zip(labels["winograd"], labels["direct"], strict=True):
        assert len(np.unique(b)) >= 3 and a.shape == b.shape
        assert (a != b).mean() <= 1e-3


def test_test_and_predict_with_norm_triton(data_root, checkpoint, tmp_path, monkeypatch):
    """`--norm triton` (fused batch norm + ReLU, here through Triton's interpreter): the same metrics and labels."""
    import danet.models.fused_norm as FN

    swapped: list[int] = []
    real = FN.use_fused_norm
    monkeypatch.setattr(FN, "use_fused_norm", lambda m, on=True: swapped.append(real(m, on)) or swapped[-1])
    images = sorted((data_root / "images" / "validation").glob("*.jpg"))[:2]
    base = ["test", PRESET, "--checkpoint", str(checkpoint), "--data-root", str(data_root), "--limit", "2"]
    results, labels = {}, {}
    for norm in ("native", "triton"):
        out = tmp_path / f"{norm}.json"
        argv = [*base, "--no-progress", "--norm", norm, "--json", str(out), "--plot", str(tmp_path / "p.png")]
        assert main(argv) == 0
        results[norm] = json.loads(out.read_text())
        pred = tmp_path / norm
        argv = ["predict", "--checkpoint", str(checkpoint), *map(str, images), "--out", str(pred), "--norm", norm]
        assert main(argv) == 0
        labels[norm] = [np.asarray(Image.open(pred / f"{img.stem}.png")) for img in images]
    assert len(swapped) == 2 and swapped[0] > 10  # test and predict with triton; native: left alone
    assert results["triton"]["settings"]["norm"] == "triton"
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc"):
        assert results["triton"][key] == pytest.approx(results["native"][key], abs=0.2, nan_ok=True), key
    for a, b in zip(labels["triton"], labels["native"], strict=True):
        assert len(np.unique(b)) >= 3 and (a != b).mean() <= 1e-3


def test_test_and_predict_with_channels_last(data_root, checkpoint, tmp_path, monkeypatch):
    """`--channels-last`: the model (and evaluation's inputs) in NHWC; the same metrics and labels."""
    import danet.engine.evaluate as E

    seen: list[bool] = []  # the layout of every image the model gets
    real = E.segment
    monkeypatch.setattr(E, "segment", lambda m, x, *a: seen.append(_nhwc(x)) or real(m, x, *a))
    layouts: list[bool] = []
    real_pick = DANet.forward
    monkeypatch.setattr(DANet, "forward", lambda self, *a, **k: layouts.append(_nhwc(_first_3x3(self)))
                        or real_pick(self, *a, **k))  # fmt: skip
    images = sorted((data_root / "images" / "validation").glob("*.jpg"))[:2]
    base = ["test", PRESET, "--checkpoint", str(checkpoint), "--data-root", str(data_root), "--limit", "2"]
    results, labels = {}, {}
    for flag in ([], ["--channels-last"]):
        name = "nhwc" if flag else "nchw"
        out = tmp_path / f"{name}.json"
        assert main([*base, "--no-progress", *flag, "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
        results[name] = json.loads(out.read_text())
        pred = tmp_path / name
        assert main(["predict", "--checkpoint", str(checkpoint), *map(str, images), "--out", str(pred), *flag]) == 0
        labels[name] = [np.asarray(Image.open(pred / f"{img.stem}.png")) for img in images]
    assert seen == [False] * 4 + [True, True, False, False]  # test's inputs follow the flag (predict's: the model)
    assert layouts == [False] * 4 + [True] * 4  # test (2) and predict (2) forwards, each run
    assert (
        results["nhwc"]["settings"]["channels_last"] is True and results["nchw"]["settings"]["channels_last"] is False
    )
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc"):
        assert results["nhwc"][key] == pytest.approx(results["nchw"][key], abs=0.2, nan_ok=True), key
    for a, b in zip(labels["nhwc"], labels["nchw"], strict=True):
        assert len(np.unique(b)) >= 3 and (a != b).mean() <= 1e-3


def _first_3x3(model) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] == 3)


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("conv=foo", ["'conv'", "direct, winograd", "'foo'"]),
        ("norm=fast", ["'norm'", "native, triton", "'fast'"]),
        ("fused_loss_impl=fast", ["'fused_loss_impl'", "chunked, compiled", "'fast'"]),
        ("fused_loss_impl=compiled", ["fused_loss_impl=compiled", "fused_loss=true"]),  # without fused_loss=true
    ],
)
def test_bad_speed_settings_are_one_line_errors(tmp_path, capsys, setting, words):
    rc = main(["train", PRESET, "--work-dir", str(tmp_path / "run"), "--set", setting])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    for w in words:
        assert w in err[0]
    assert not (tmp_path / "run").exists()


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(DanetError, match="fused_loss=true"):
        RunConfig(fused_loss_impl="compiled").validate()
    with pytest.raises(DanetError, match="direct, winograd"):
        RunConfig(conv="Winograd").validate()
    RunConfig(fused_loss=True, fused_loss_impl="compiled", conv="winograd").validate()
