"""Winograd F(4x4, 3x3) convolution (danet.models.winograd): the same convolution, by fewer multiplications.

float64: forward and both gradients equal `F.conv2d` to ~1e-15 (limit 1e-12) for every dilation DANet uses, odd
sizes (partial tiles) and both memory formats; float32 within its rounding (~3e-6; limit 3e-5). The module switch
keeps parameters and state-dict keys, sees new weights, falls back where it does not apply, and a whole DANet
switched to it gives the direct model's logits and gradients (float64, 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danet
import danet.models.winograd as W


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("hw", [(16, 16), (13, 11), (5, 7), (1, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_gradients_equal_conv2d_in_float64(dilation, hw, channels_last):
    g = torch.Generator().manual_seed(dilation * 100 + hw[0])
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = W.winograd_conv2d(x, w, dilation)
    ref = F.conv2d(x, w, padding=dilation, dilation=dilation)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel(y, ref) < 1e-12
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    assert rel(gx, rx) < 1e-12 and rel(gw, rw) < 1e-12
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("chunk_bytes", [1, 2**30])  # one tile row per chunk; everything in one chunk
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_inference_path_equals_conv2d_in_float64(monkeypatch, chunk_bytes, dilation):
    monkeypatch.setattr(W, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(3, 6, 29, 23, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = W.winograd_conv2d(x, w, dilation, W.weight_transform(w))
        y2 = W.winograd_conv2d(x.contiguous(memory_format=torch.channels_last), w, dilation)
    ref = F.conv2d(x, w, padding=dilation, dilation=dilation)
    assert rel(y, ref) < 1e-12 and rel(y2, ref) < 1e-12
    assert y2.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: W.winograd_conv2d(a, b, 2), (x, w))


def test_float32_within_rounding_of_the_exact_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 24, 20, generator=g)
    w = torch.randn(32, 64, 3, 3, generator=g) * 0.05
    exact = F.conv2d(x.double(), w.double(), padding=2, dilation=2)
    direct = F.conv2d(x, w, padding=2, dilation=2)
    wino = W.winograd_conv2d(x, w, 2)
    assert wino.dtype == torch.float32
    assert rel(wino, exact) < 3e-5
    assert rel(direct, exact) < 1e-6  # the direct kernel's own rounding, for scale


def conv(cin=8, cout=8, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 3, **{"padding": 1, "bias": False, **kw})


def test_eligibility():
    assert W.eligible(conv(256, 256))
    assert W.eligible(conv(512, 256, padding=4, dilation=4))
    assert not W.eligible(conv(128, 512))  # too few channels to pay
    assert not W.eligible(conv(256, 256, stride=2))
    assert not W.eligible(conv(256, 256, padding=1, dilation=2))  # not a 'same' convolution
    assert not W.eligible(conv(256, 256, groups=2))
    assert not W.eligible(conv(256, 256, padding_mode="reflect"))
    assert not W.eligible(nn.Conv2d(256, 256, 1))


def test_switch_keeps_parameters_and_switches_back(monkeypatch):
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    net = nn.Sequential(conv(bias=True), nn.ReLU(), conv(padding=2, dilation=2), nn.Conv2d(8, 8, 1), conv(stride=2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    x = torch.randn(1, 8, 10, 12, dtype=torch.float64)
    net.double()
    ref = net(x)
    assert W.use_winograd(net) == 2  # the two stride-1 3x3s; not the 1x1, not the stride-2 one
    assert [type(m) for m in net] == [W.WinogradConv2d, nn.ReLU, W.WinogradConv2d, nn.Conv2d, nn.Conv2d]
    assert list(net.parameters()) == params and list(net.state_dict()) == list(before)
    assert rel(net(x), ref) < 1e-12  # with the bias
    assert W.use_winograd(net) == 0  # already switched
    assert W.use_winograd(net, False) == 2
    assert all(type(m) is not W.WinogradConv2d for m in net)


def test_inference_cache_follows_the_weights(monkeypatch):
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    c = conv().double()
    W.use_winograd(c)
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(c(x), F.conv2d(x, c.weight, padding=1)) < 1e-12
        c.weight.mul_(-2.0)  # in place: a new version of the same tensor
        assert rel(c(x), F.conv2d(x, c.weight, padding=1)) < 1e-12
        c.load_state_dict({"weight": torch.randn(8, 8, 3, 3, dtype=torch.float64)})
        assert rel(c(x), F.conv2d(x, c.weight, padding=1)) < 1e-12
    with torch.inference_mode():
        assert rel(c(x), F.conv2d(x, c.weight, padding=1)) < 1e-12
    c.float().double()  # new tensors, rounded values: the cache must not survive a conversion
    with torch.no_grad():
        assert rel(c(x), F.conv2d(x, c.weight, padding=1)) < 1e-12


def test_falls_back_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    c = conv()
    W.use_winograd(c)
    calls = []
    monkeypatch.setattr(W, "winograd_conv2d", lambda *a, **k: calls.append(1))
    x = torch.randn(1, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(c(x), nn.Conv2d.forward(c, x))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(c, backend="eager")(x), nn.Conv2d.forward(c, x))  # dynamo cannot trace it
    assert torch.equal(c.bfloat16()(x.bfloat16()), F.conv2d(x.bfloat16(), c.weight, padding=1))
    assert calls == []


NARROW = dict(num_classes=5, base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16)


def test_whole_danet_logits_and_gradients_equal_direct_in_float64(monkeypatch):
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    torch.manual_seed(0)
    model = danet.create_model("danet_r50-d8_ade20k", **NARROW).double()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    model.eval()
    ref = model(x)["out"]
    switched = W.use_winograd(model)
    assert switched >= 10  # backbone stage 1-4 3x3s, the head's and the auxiliary head's
    assert rel(model(x)["out"], ref) < 1e-10
    model.train()
    grads = []
    for enabled in (True, False):
        W.use_winograd(model, enabled)
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks
        sum(v.square().mean() for v in model(x).values()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rel(grads[0], grads[1]) < 1e-10


def test_real_r50_d8_switches_the_wide_convolutions_and_keeps_float32_logits():
    torch.manual_seed(0)
    model = danet.create_model("danet_r50-d8_ade20k").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)["out"]
        # stage 3 (6 x 256) and 4 (3 x 512) 3x3s, the head's two 2048->512 and two 512->512, the auxiliary head's
        # 1024->512; not stages 1-2 (64, 128 channels)
        assert W.use_winograd(model) == 14
        out = model(x)["out"]
    assert rel(out, ref) < 1e-4


def test_set_inference_conv(monkeypatch):
    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    net = nn.Sequential(conv(), nn.ReLU(), conv()).double()
    x = torch.randn(1, 8, 11, 9, dtype=torch.float64)
    ref = net(x)
    assert W.set_inference_conv(net, "direct") is net and type(net[0]) is nn.Conv2d
    assert net[0].weight.is_contiguous()
    W.set_inference_conv(net, "winograd")
    assert type(net[0]) is W.WinogradConv2d and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = net(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and rel(y, ref) < 1e-12
