"""The stem's max pooling as a Triton kernel (`models/triton_pool.py`), through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): the same bits as PyTorch's max pooling; taken only where it should be. Its sm_90 compile:
tests/test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import danet

pytest.importorskip("triton")
import danet.models.triton_pool as TP  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setattr(TP, "INTERPRETER", True)  # the kernel through Triton's interpreter (CUDA only otherwise)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "k", "s", "p"), [((2, 70, 9, 13), 3, 2, 1), ((1, 8, 1, 1), 3, 2, 1),
                                                    ((1, 130, 6, 5), 2, 2, 0), ((2, 3, 7, 8), 3, 1, 1)])  # fmt: skip
def test_same_bits_as_pytorch(shape, k, s, p, dtype):
    """Odd sizes (the last windows hang over the edge: padding -inf), channels not a multiple of the block, a single
    pixel, other kernels and strides; values with ties, negatives and a NaN (PyTorch propagates it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).round().to(dtype) - 3  # ties and negatives
    x.view(-1)[5] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    pool = nn.MaxPool2d(k, stride=s, padding=p)
    with torch.no_grad():
        assert TP.runs(pool, x)
        ours, ref = TP.max_pool(pool, x), pool(x)
    assert ours.shape == ref.shape and ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().any()
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))


def test_taken_only_where_it_can_run():
    """Gradients on, an NCHW map, dilation, ceil_mode or indices: PyTorch's pooling (the same call as before)."""
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    assert not TP.runs(pool, x)  # gradients on
    with torch.no_grad():
        assert not TP.runs(pool, x.contiguous())
        for other in (nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                      nn.MaxPool2d(3, 2, 1, return_indices=True), nn.MaxPool2d((3, 2), 2, 1)):  # fmt: skip
            assert not TP.runs(other, x)
        assert TP.runs(pool, x) and torch.equal(TP.max_pool(pool, x), pool(x))


def test_the_model_uses_it_on_cuda_where_enabled(monkeypatch):
    """ENABLED (the default): the stem's pooling goes through the kernel in a channels-last inference forward on CUDA
    (here Triton's interpreter, INTERPRETER), with the same logits bit for bit; on the CPU without INTERPRETER, as a
    user's CPU runs it, and with ENABLED off, PyTorch's pooling."""
    ran = []
    real = TP.runs
    monkeypatch.setattr(TP, "runs", lambda pool, x: ran.append(real(pool, x)) or ran[-1])
    monkeypatch.setattr(TP, "INTERPRETER", False)
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 48, 64).contiguous(memory_format=torch.channels_last)
    assert TP.ENABLED
    with torch.no_grad():
        ref = model(x)["out"]
        assert ran == [False]
        monkeypatch.setattr(TP, "INTERPRETER", True)
        ours = model(x)["out"]
        assert ran == [False, True] and torch.equal(ours, ref)
        monkeypatch.setattr(TP, "ENABLED", False)
        model(x)
    assert ran == [False, True]
