"""The logits' bilinear resize as a Triton kernel (`models/triton_resize.py`), through Triton's interpreter (conftest
sets TRITON_INTERPRET=1): PyTorch's values to rounding in float64, float32 and bf16, either align_corners, up and
down, any layout; taken only where it should be. Its sm_90 compile: tests/test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import danet

pytest.importorskip("triton")
import danet.models.triton_resize as TR  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setattr(TR, "INTERPRETER", True)  # the kernel through Triton's interpreter (CUDA only otherwise)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", [(8, 16, 64, 128), (5, 7, 33, 50), (1, 1, 4, 4), (6, 6, 6, 6), (9, 4, 3, 17)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pytorchs_bilinear_resize(sizes, align_corners, channels_last):
    """Up (by 8, as the logits), by odd factors, from one pixel, the same size (a copy), down; both layouts in,
    NCHW out. float64 to 1e-14, float32 within a few of its roundings, bf16 within one of its own (the interpreter
    truncates to bf16 where a GPU rounds)."""
    h, w, oh, ow = sizes
    g = torch.Generator().manual_seed(h * w)
    base = torch.randn(2, 19, h, w, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 2**-7)):
        x = base.to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.no_grad():
            assert TR.runs(x)
            ours = TR.resize_bilinear(x, (oh, ow), align_corners)
        ref = F.interpolate(x.double(), (oh, ow), mode="bilinear", align_corners=align_corners)
        assert ours.shape == (2, 19, oh, ow) and ours.dtype == dtype and ours.is_contiguous()
        assert rel(ours, ref) < tol
    if (h, w) == (oh, ow) and not align_corners:
        assert torch.equal(TR.resize_bilinear(base, (oh, ow)), base)  # the same size: a copy


def test_taken_only_in_inference_where_enabled(monkeypatch):
    """ENABLED (the default): the model's logits resize through the kernel in an inference forward on CUDA (here the
    interpreter), within float32 rounding of PyTorch's; never with gradients, with nchw=False, on the CPU without
    INTERPRETER (as a user's CPU runs it), with ENABLED off, or for more than MAX_CLASSES classes."""
    from danet.models.danet import upsample_logits

    calls = []
    real = TR.resize_bilinear
    monkeypatch.setattr(TR, "resize_bilinear", lambda *a: calls.append(tuple(a[1])) or real(*a))
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16).eval()
    x = torch.randn(1, 3, 48, 64)
    assert TR.ENABLED
    with torch.no_grad():
        ours = model(x)["out"]
        monkeypatch.setattr(TR, "ENABLED", False)
        ref = model(x)["out"]
        monkeypatch.setattr(TR, "ENABLED", True)
        logits = torch.randn(1, TR.MAX_CLASSES, 6, 8)
        up = F.interpolate(logits, (48, 64), mode="bilinear")
        assert torch.equal(upsample_logits(logits, (48, 64), nchw=False), up)
        assert rel(upsample_logits(logits, (48, 64)), up) < 1e-6
        many = torch.randn(1, TR.MAX_CLASSES + 1, 6, 8)
        assert torch.equal(upsample_logits(many, (48, 64)), F.interpolate(many, (48, 64), mode="bilinear"))
        monkeypatch.setattr(TR, "INTERPRETER", False)
        model(x)
    assert calls == [(48, 64)] * 2  # the first forward's logits, the 32 classes; none for nchw=False, 33 or the CPU
    assert rel(ours, ref) < 1e-6
    monkeypatch.setattr(TR, "INTERPRETER", True)
    model(x)  # gradients on
    assert len(calls) == 2
    with torch.no_grad():
        assert not TR.runs(torch.randn(3, 4, 4)) and not TR.runs(torch.zeros(1, 2, 0, 4))
        assert TR.runs(torch.randn(1, 2, 3, 4))
