"""The Triton fused loss (engine/triton_loss.py), run through Triton's CPU interpreter (TRITON_INTERPRET=1).

The kernel is the GPU's; the interpreter executes the same program on CPU tensors, one tile at a time (slowly:
the shapes here are small). Against the chunked implementation in float64: the CE sum and its gradient to float32
rounding, for even, odd and unit scales, ignored pixels, a one-row map and 150 classes; through `fused_danet_loss`
with autograd, dtypes and memory formats; and the one-line errors.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import danet.engine.fused_loss as L
import danet.engine.triton_loss as TL
from danet.config import RunConfig
from danet.errors import DanetError

# triton is in the [test] extra on Linux (its wheels are Linux-only): there these tests always run
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" and importlib.util.find_spec("triton") is None, reason="no triton wheels off Linux"
)


@pytest.fixture
def interpreted():
    """Triton in interpreter mode (tests/conftest.py sets it before triton is imported; triton is in [test])."""
    assert os.environ.get("TRITON_INTERPRET") == "1"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    ("b", "k", "h", "w", "s"),
    [(2, 5, 2, 3, 8), (1, 3, 4, 3, 4), (1, 7, 3, 3, 3), (1, 4, 1, 3, 2), (1, 150, 2, 2, 8)],
)
def test_sum_and_gradient_equal_the_chunked_loss(interpreted, b, k, h, w, s):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(b, k, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, k, (b, h * s, w * s), generator=g)
    t[torch.rand(t.shape, generator=g) < 0.2] = 255
    ref = L.UpsampledCrossEntropy.apply(z, t, 255)
    (g_ref,) = torch.autograd.grad(ref, z)
    total, grad = TL.upsampled_ce(z.detach().float(), t, 255)
    assert total.dtype == grad.dtype == torch.float32 and grad.shape == z.shape
    assert abs(total.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert rel(grad, g_ref) < 1e-6


def test_through_fused_danet_loss_with_autograd(interpreted):
    g = torch.Generator().manual_seed(0)
    outputs = {n: torch.randn(2, 5, 2, 3, generator=g) for n in ("out", "pam", "cam", "aux")}
    outputs["aux"] = outputs["aux"].contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 5, (2, 8, 12), generator=g)
    t[:, :2] = 255
    results = {}
    for impl in ("chunked", "triton"):
        leaves = {n: v.clone().requires_grad_() for n, v in outputs.items()}
        losses = L.fused_danet_loss(leaves, t, "mmseg", ignore_index=255, impl=impl)
        losses["loss"].backward()
        results[impl] = (losses, {n: v.grad for n, v in leaves.items()})
    (lc, gc), (lt, gt) = results["chunked"], results["triton"]
    assert lc.keys() == lt.keys()
    for key in lc:
        assert lt[key].item() == pytest.approx(lc[key].item(), rel=1e-5), key
    for n in outputs:
        assert gt[n].dtype == torch.float32 and rel(gt[n], gc[n]) < 1e-5, n
    assert gt["aux"].is_contiguous(memory_format=torch.channels_last) and gt["out"].is_contiguous()


def test_bfloat16_logits_give_bfloat16_gradients(interpreted):
    z = torch.randn(1, 4, 2, 3).bfloat16().requires_grad_()
    t = torch.randint(0, 4, (1, 8, 12))
    L.fused_danet_loss({"out": z}, t, impl="triton")["loss"].backward()
    ref = z.detach().float().requires_grad_()
    L.fused_danet_loss({"out": ref}, t, impl="chunked")["loss"].backward()
    assert z.grad.dtype == torch.bfloat16 and rel(z.grad, ref.grad) < 1e-2


def test_non_integer_scale_is_a_one_line_error(interpreted):
    with pytest.raises(DanetError, match="integer multiple") as e:
        TL.upsampled_ce(torch.randn(1, 3, 4, 4), torch.zeros(1, 30, 32, dtype=torch.long), 255)
    assert "\n" not in str(e.value)


def test_without_triton_a_one_line_error(monkeypatch):
    monkeypatch.setattr(TL, "triton", None)  # as after a failed `import triton`
    with pytest.raises(DanetError, match="needs the triton package"):
        TL.upsampled_ce(torch.randn(1, 3, 2, 2), torch.zeros(1, 16, 16, dtype=torch.long), 255)


def test_config_accepts_triton_with_fused_loss_only():
    RunConfig(fused_loss=True, fused_loss_impl="triton").validate()
    with pytest.raises(DanetError, match="fused_loss_impl=triton' needs fused_loss=true"):
        RunConfig(fused_loss_impl="triton").validate()
