"""Speed options give the plain float32 result: fused loss, bf16 autocast, channels_last, fused attention, compile.

Each option is checked against the plain path on a narrow DANet-R50 (the real structure at a few channels), with a
tolerance that fits the option: float64 for the exact rewrites (fused loss), float32 rounding for layout and kernel
changes, bf16 rounding for autocast. Also `danet benchmark` itself (CLI, JSON, figures).
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

import danet
import danet.benchmark as B
import danet.engine.fused_loss as L
from danet.cli import main
from danet.engine.losses import danet_loss

NARROW = dict(num_classes=5, base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on the 2-core CI machine
    yield
    torch.set_num_threads(old)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN affine and running statistics, attention gamma 0.5: a fresh init would hide the attention branches
    (gamma 0) and make the features nearly constant (BN at identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)
    return model


def narrow_model(seed: int = 0, dtype=torch.float32) -> danet.DANet:
    """Narrow DANet-R50-D8 with perturbed BN and gamma."""
    torch.manual_seed(seed)
    return perturb(danet.create_model("danet_r50-d8_ade20k", **NARROW), seed + 1).to(dtype)


def batch(n=2, h=32, w=32, seed=0, k=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    y = torch.randint(0, k, (n, h, w), generator=g)
    y[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return x, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def upsampled(outputs: dict, size) -> dict:
    return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in outputs.items()}


# ----------------------------------------------------------------------------------------------- fused loss
@pytest.mark.parametrize("variant", ["ssseg", "mmseg"])
@pytest.mark.parametrize(
    ("h", "w", "H", "W", "band_bytes"),
    [
        (7, 9, 56, 72, 1 << 30),  # exact x8, one band
        (7, 9, 56, 72, 2 * 5 * 72 * 4 * 8),  # exact x8, bands of 2 input rows (+ a ragged last band), halo rows
        (5, 6, 37, 45, 1),  # not a multiple: whole-image path
    ],
)
def test_fused_loss_equals_reference_in_float64(monkeypatch, variant, h, w, H, W, band_bytes):
    monkeypatch.setattr(L, "BAND_BYTES", band_bytes)
    g = torch.Generator().manual_seed(h * W)
    outs = {k: torch.randn(2, 5, h, w, generator=g, dtype=torch.float64).requires_grad_() for k in L.WEIGHTS}
    outs["pam"] = outs["pam"].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.randint(0, 5, (2, H, W), generator=g)
    y[torch.rand(2, H, W, generator=g) < 0.3] = 255
    y[1, : H // 2] = 255  # a block of ignored rows spanning several bands
    ref = danet_loss(upsampled(outs, (H, W)), y, variant)
    # NOTE: engine.losses computes in float32; redo the reference in float64 for an exact comparison
    ce = {k: F.cross_entropy(v, y, ignore_index=255, reduction="sum") for k, v in upsampled(outs, (H, W)).items()}
    denom = (y != 255).sum() if variant == "ssseg" else y.numel()
    ref64 = sum(L.WEIGHTS[k] * ce[k] / denom for k in ce)
    fused = L.fused_danet_loss(outs, y, variant)
    assert abs(fused["loss"].item() - ref64.item()) < 1e-12
    assert abs(fused["loss"].item() - ref["loss"].item()) < 1e-5  # float32 reference
    assert set(fused) == set(ref)
    g_ref = torch.autograd.grad(ref64, list(outs.values()))
    g_fused = torch.autograd.grad(fused["loss"], list(outs.values()))
    for a, b in zip(g_fused, g_ref, strict=True):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize(
    ("h", "w", "sh", "sw"), [(7, 9, 8, 8), (1, 3, 8, 4), (4, 1, 2, 16), (5, 6, 16, 16), (2, 2, 1, 1)]
)
def test_gemm_upsample_and_adjoint_equal_aten(h, w, sh, sw):
    """The CUDA path's upsample as small GEMMs (and its transpose) against F.interpolate and aten's backward."""
    g = torch.Generator().manual_seed(h * w)
    z = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    size = (h * sh, w * sw)
    ref = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    up = L.upsample_nhwc(z[0].permute(1, 2, 0).contiguous(), sh, sw).view(*size, 3).permute(2, 0, 1)
    assert (up - ref[0]).abs().max() < 1e-13
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    adj_ref = torch.ops.aten.upsample_bilinear2d_backward(gy, size, z.shape, False)[0]
    adj = L.upsample_nhwc_adjoint(gy[0].permute(1, 2, 0).reshape(-1, 3), h, w, sh, sw).permute(2, 0, 1)
    assert (adj - adj_ref).abs().max() < 1e-12


@pytest.mark.parametrize("path", ["always", "never"])
def test_gemm_and_band_paths_of_the_loss_agree(monkeypatch, path):
    """The loss through the GEMM path (CUDA's; forced here) and the band path (the CPU's), float64 and float32."""
    monkeypatch.setattr(L, "GEMM_PATH", path)
    monkeypatch.setattr(L, "BAND_BYTES", 2 * 5 * 72 * 4 * 8)
    g = torch.Generator().manual_seed(7)
    outs = {k: torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64).requires_grad_() for k in L.WEIGHTS}
    y = torch.randint(0, 5, (2, 56, 72), generator=g)
    y[torch.rand(2, 56, 72, generator=g) < 0.3] = 255
    ce = {k: F.cross_entropy(v, y, ignore_index=255, reduction="sum") for k, v in upsampled(outs, (56, 72)).items()}
    ref = sum(L.WEIGHTS[k] * ce[k] for k in ce) / (y != 255).sum()
    fused = L.fused_danet_loss(outs, y)["loss"]
    assert abs(fused.item() - ref.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(fused, list(outs.values())), torch.autograd.grad(ref, list(outs.values())),
                    strict=True):  # fmt: skip
        assert rel(a, b) < 1e-12
    o32 = {k: v.detach().float().requires_grad_() for k, v in outs.items()}
    f32 = L.fused_danet_loss(o32, y)["loss"]
    assert abs(f32.item() - ref.item()) < 1e-5 * ref.item()


def test_fused_loss_gradcheck_and_all_ignored(monkeypatch):
    monkeypatch.setattr(L, "BAND_BYTES", 1)  # one input row per band
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (2, 32, 40))
    t[0] = 255  # a whole image ignored: contributes nothing
    assert torch.autograd.gradcheck(lambda z: L.UpsampledCrossEntropy.apply(z, t, 255), (z,))
    t[:] = 255
    loss = L.fused_danet_loss({"out": z}, t)["loss"]
    assert loss.item() == 0.0  # as engine.losses: 0, not NaN, when nothing is labelled


def test_compiled_loss_equals_chunked(monkeypatch):
    """The torch.compile'd kernels' formulation (here traced by dynamo, run eagerly: inductor on the GPU run)."""
    monkeypatch.setattr(L, "COMPILE_BACKEND", "eager")
    g = torch.Generator().manual_seed(3)
    outs = {k: torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64).requires_grad_() for k in L.WEIGHTS}
    y = torch.randint(0, 5, (2, 48, 56), generator=g)
    y[torch.rand(2, 48, 56, generator=g) < 0.3] = 255
    ref = L.fused_danet_loss(outs, y, impl="chunked")
    comp = L.fused_danet_loss(outs, y, impl="compiled")
    assert abs(comp["loss"].item() - ref["loss"].item()) < 1e-12
    for a, b in zip(torch.autograd.grad(comp["loss"], list(outs.values())),
                    torch.autograd.grad(ref["loss"], list(outs.values())), strict=True):  # fmt: skip
        assert rel(a, b) < 1e-12


def test_fused_loss_trains_the_model_like_the_reference():
    model = narrow_model().train()
    x, y = batch(h=40, w=48)
    torch.manual_seed(5)
    ref = danet_loss(model(x), y)
    g_ref = torch.autograd.grad(ref["loss"], list(model.parameters()))
    torch.manual_seed(5)  # the same dropout masks
    fused = L.fused_danet_loss(model(x, resize=False), y)
    g_fused = torch.autograd.grad(fused["loss"], list(model.parameters()))
    for k in ref:
        assert abs(fused[k].item() - ref[k].item()) < 1e-5 * abs(ref[k].item())
    assert rel(torch.cat([g.flatten() for g in g_fused]), torch.cat([g.flatten() for g in g_ref])) < 1e-5


# ----------------------------------------------------------------------------------------------- model options
def test_channels_last_and_explicit_attention_match_float32():
    model = narrow_model().eval()
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)["out"]
        model.set_fused_attention(False)
        explicit = model(x)["out"]
        model.set_fused_attention(True)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))["out"]
    assert rel(explicit, ref) < 1e-5  # float32 rounding: the fused kernel sums in another order
    assert rel(cl, ref) < 1e-5


def test_attention_modules_keep_channels_last_and_compute_the_same():
    """Both attention modules on a channels-last map (the CAM's product computed transposed, so that its output is
    written in that layout, and the residual x + gamma * out in one pass): float64 to rounding of the NCHW
    forward and of the formula, output channels last, and gradients (gamma's included) alike."""
    from danet.models.attention import ChannelAttention, PositionAttention

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 7, 9, generator=g, dtype=torch.float64)
    for module in (ChannelAttention(), PositionAttention(32, 8)):
        module = module.double()
        with torch.no_grad():
            module.gamma.fill_(0.7)
        outs, grads = [], []
        for cl in (False, True):
            xx = (x.contiguous(memory_format=torch.channels_last) if cl else x.clone()).requires_grad_()
            m = module.to(memory_format=torch.channels_last) if cl else module
            out = m(xx)
            assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(x)).sum().backward()
            outs.append(out.detach())
            grads.append(torch.cat([xx.grad.flatten(), *[p.grad.flatten() for p in m.parameters()]]))
            m.zero_grad()
        assert rel(outs[1], outs[0]) < 1e-13 and rel(grads[1], grads[0]) < 1e-12
    q = x.flatten(2)
    e = q @ q.transpose(1, 2)
    ref = 0.7 * (torch.softmax(e.amax(-1, keepdim=True) - e, -1) @ q).view_as(x) + x
    cam = ChannelAttention().double()
    with torch.no_grad():
        cam.gamma.fill_(0.7)
        assert rel(cam(x.contiguous(memory_format=torch.channels_last)), ref) < 1e-14


def test_the_channel_attentions_residual_in_the_products_epilogue(monkeypatch):
    """GEMM_RESIDUAL (inference): x + (gamma attn) x as one baddbmm gives the formula's output, float64 to rounding,
    in x's layout (channels last or NCHW); bf16 within rounding of the addcmul's; with gradients the usual path."""
    import danet.models.attention as A

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 7, 9, generator=g, dtype=torch.float64)
    cam = A.ChannelAttention().double()
    with torch.no_grad():
        cam.gamma.fill_(0.7)
    q = x.flatten(2)
    e = q @ q.transpose(1, 2)
    ref = 0.7 * (torch.softmax(e.amax(-1, keepdim=True) - e, -1) @ q).view_as(x) + x
    products = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a: products.append(1) or real(*a))
    monkeypatch.setattr(A, "GEMM_RESIDUAL", True)
    with torch.no_grad():
        for fmt in (torch.channels_last, torch.contiguous_format):
            out = cam(x.contiguous(memory_format=fmt))
            assert rel(out, ref) < 1e-14 and out.is_contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xh = x.float().contiguous(memory_format=torch.channels_last)
            fused = cam.float()(xh.bfloat16())
            monkeypatch.setattr(A, "GEMM_RESIDUAL", False)
            apart = cam(xh.bfloat16())
    assert len(products) == 3 and fused.dtype == apart.dtype == torch.bfloat16
    assert rel(fused.double(), apart.double()) < 1e-2
    monkeypatch.setattr(A, "GEMM_RESIDUAL", True)
    xx = x.clone().requires_grad_()
    cam.double()(xx).sum().backward()  # with gradients: product and addcmul, as in training
    assert len(products) == 3 and xx.grad is not None


class FakeStream:
    """Stands in for a CUDA stream on the CPU: records who waits for whom."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


def test_branch_streams_fork_and_join_in_inference_only(monkeypatch):
    """The CAM branch goes to the side stream after that stream waits for the caller's, and the caller's waits for it
    before the sum; its output is marked as used on the caller's stream. Training, gradients and `branch_streams` off
    keep one stream. The values are the serial head's (streams change no arithmetic; the GPU suite's `head` group
    compares them bit for bit on CUDA)."""
    import danet.models.heads as H

    log: list = []
    main_s, side_s = FakeStream("main", log), FakeStream("side", log)
    monkeypatch.setattr(H, "_on_cuda", lambda x: True)
    monkeypatch.setattr(H, "_side_stream", lambda device: side_s)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main_s)

    class Enter:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            log.append(f"on {self.s.name}")

        def __exit__(self, *exc):
            log.append(f"off {self.s.name}")

    monkeypatch.setattr(torch.cuda, "stream", Enter)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(f"record {s.name}"), raising=False)
    cam_calls = []
    model = narrow_model().eval()
    orig = model.head._cam_branch
    monkeypatch.setattr(model.head, "_cam_branch", lambda x: (cam_calls.append(list(log)), orig(x))[1])
    classify = model.head.cls.forward
    monkeypatch.setattr(model.head.cls, "forward", lambda x: (log.append("sum classified"), classify(x))[1])
    x, _ = batch()
    with torch.no_grad():
        model.head.branch_streams = False
        ref = model(x)["out"]
        assert log == ["sum classified"]
        log.clear()
        model.head.branch_streams = True
        out = model(x)["out"]
    assert torch.equal(out, ref)
    # the input is marked as read on the side stream; the sum waits for the join
    assert log == ["side waits main", "record side", "on side", "off side", "main waits side", "record main",
                   "sum classified"]  # fmt: skip
    assert cam_calls[-1] == ["side waits main", "record side", "on side"]  # the branch ran in the side's context
    log.clear()
    pam_in = model.head.pam_in.forward
    monkeypatch.setattr(model.head.pam_in, "forward", lambda x: (_ for _ in ()).throw(MemoryError("PAM")))
    with torch.no_grad(), pytest.raises(MemoryError):
        model(x)
    assert log[-2:] == ["main waits side", "record main"]  # joined even though the PAM branch raised
    monkeypatch.setattr(model.head.pam_in, "forward", pam_in)
    log.clear()
    model(x)  # gradients on: one stream
    model.train()
    with torch.no_grad():
        model(x)
    assert log == ["sum classified"] * 2
    # "auto" (the default): side by side where the head's map has at most STREAMS_MAX_POSITIONS (batch x h x w)
    model.eval()
    assert H.DAHead(8, 8, 2).branch_streams == "auto"
    model.head.branch_streams = "auto"
    positions = x.shape[0] * (x.shape[2] // 8) * (x.shape[3] // 8)  # output stride 8
    for limit, streams in ((positions, True), (positions - 1, False)):
        monkeypatch.setattr(H, "STREAMS_MAX_POSITIONS", limit)
        log.clear()
        with torch.no_grad():
            model(x)
        assert ("side waits main" in log) == streams


@pytest.mark.parametrize("corners", [False, True])
def test_upsample_logits_through_nchw_gives_the_same_values(corners):
    """`upsample_logits`'s CUDA path (a channels_last input resized through the NCHW kernel) on the CPU's kernels:
    the same function as resizing the channels_last tensor itself (in float64; the CPU's two kernels round in other
    orders), an NCHW result. On CUDA both kernels evaluate one expression: the GPU suite's `resize` group compares
    them bit for bit."""
    from danet.models.danet import upsample_logits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 9, 11, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ref = F.interpolate(x, size=(72, 88), mode="bilinear", align_corners=corners)
    out = upsample_logits(x, (72, 88), corners, nchw=True)
    assert out.is_contiguous() and not ref.is_contiguous()
    assert rel(out, ref) < 1e-14
    assert upsample_logits(x, (72, 88), corners).is_contiguous(memory_format=torch.channels_last)  # CPU: as it was


@pytest.mark.parametrize("variant", ["d8", "d16_channels_last", "single_stem"])
def test_folded_batch_norm_gives_the_same_logits(variant):
    """`norm="folded"`: every batch norm folded into the convolution before it (the projection shortcut's shift into
    the block's last convolution) gives the unfolded network's logits in float64, to 1e-12; a folded model refuses to
    train, and folding refuses a model in training mode."""
    from danet.models.folded import FoldedConv2d, fold_batch_norm

    kw = {"stem": "single"} if variant == "single_stem" else {}
    preset = "danet_r50-d16_ade20k" if variant.startswith("d16") else "danet_r50-d8_ade20k"
    torch.manual_seed(0)
    model = perturb(danet.create_model(preset, **NARROW, **kw), 1).double().eval()
    x, _ = batch()
    x = x.double()
    if "channels_last" in variant:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)["out"]
        folded = copy.deepcopy(model)
        n = fold_batch_norm(folded, torch.float64)
        out = folded(x)["out"]
    convs = sum(isinstance(m, FoldedConv2d) for m in folded.modules())
    assert n == convs == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert rel(out, ref) < 1e-12
    with pytest.raises(danet.DanetError, match="inference only"):
        folded.train()
    assert not any(m.training for m in folded.modules())  # refused before any module's flag moved
    with pytest.raises(danet.DanetError, match="folded already"):
        fold_batch_norm(folded, torch.float64)
    with torch.no_grad():
        assert torch.equal(folded(x)["out"], out)  # the refused calls changed nothing
    with pytest.raises(danet.DanetError, match="eval mode"):
        fold_batch_norm(model.train(), torch.float64)


def test_a_model_folded_in_bf16_says_how_to_run_it():
    """Folded in bf16 and run without autocast: one DanetError naming the autocast to use (it was PyTorch's
    dtype-mismatch error from a later layer); under that autocast it runs. Its other convolutions' weights are in
    bf16 too, cast once: the same logits, bit for bit, as with float32 weights that autocast casts at each forward."""
    from danet.models.folded import FoldedConv2d, fold_batch_norm

    model = narrow_model().eval()
    kept = copy.deepcopy(model)
    fold_batch_norm(model, torch.bfloat16)
    fold_batch_norm(kept, torch.bfloat16)
    originals = dict(narrow_model().eval().named_modules())
    plain = [(n, m) for n, m in kept.named_modules() if type(m) is torch.nn.Conv2d]
    assert len(plain) == 7  # the attention's 3 projections, the classifiers (3 and the auxiliary head's)
    for name, m in plain:  # as before: the float32 weights
        m.weight, m.bias = originals[name].weight, originals[name].bias
        assert m.weight.dtype == torch.float32
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert any(isinstance(m, FoldedConv2d) for m in model.modules())
    x, _ = batch()
    with torch.no_grad():
        with pytest.raises(danet.DanetError, match=r"in bfloat16.*torch.autocast\('cpu', dtype=torch.bfloat16\)"):
            model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)["out"]
            assert out.dtype == torch.bfloat16 and torch.equal(out, kept(x)["out"])


def fake_cudnn(monkeypatch, calls: list, refuse=lambda dilation: False):
    """Stand-ins for `torch.cudnn_convolution_relu` / `cudnn_convolution_add_relu` with those ops' documented meaning
    (relu(conv(x, w) + alpha * z + bias)), taken on the CPU (`_cudnn_fuses`), recording ("relu" | "add_relu",
    dilation) in `calls`; `refuse(dilation)`: raise as cuDNN without an engine. Returns the folded module and a
    perturbed float64 R50-D8 whose channel counts are multiples of 8 but the image's."""
    import danet.models.folded as Fo

    def conv(kind, x, w, b, stride, padding, dilation, groups, z=None, alpha=0.0):
        calls.append((kind, dilation[0]))
        if refuse(dilation[0]):
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore")
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return torch.relu(y if z is None else y + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", lambda x, w, b, *args: conv("relu", x, w, b, *args))
    add_relu = lambda x, w, z, alpha, b, *args: conv("add_relu", x, w, b, *args, z=z, alpha=alpha)  # noqa: E731
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", add_relu)
    monkeypatch.setattr(Fo, "_cudnn_fuses", lambda x: True)
    torch.manual_seed(0)
    widths = dict(NARROW, base_channels=8, stem_channels=16)
    return Fo, perturb(danet.create_model("danet_r50-d8_ade20k", **widths), 1).double().eval()


def test_folded_convolutions_call_cudnns_fused_ops_with_the_right_arguments(monkeypatch):
    """On CUDA the folded convolutions run `torch.cudnn_convolution_relu` / `cudnn_convolution_add_relu` (bias, residual
    and ReLU in the convolution's epilogue). Stand-ins check on the CPU that every call passes its arguments in the
    schema's order; the logits stay those of the unfolded network. A convolution whose channels are not a multiple of
    8 (the image's) keeps F.conv2d."""
    calls = []
    Fo, model = fake_cudnn(monkeypatch, calls)
    x, _ = batch()
    with torch.no_grad():
        ref = model(x.double())["out"]
        Fo.fold_batch_norm(model, torch.float64)
        out = model(x.double())["out"]
    assert rel(out, ref) < 1e-12
    kinds = [kind for kind, _ in calls]
    # blocks; stem (its first convolution, of the image's 3 channels, through F.conv2d), conv1/2, head
    assert kinds.count("add_relu") == 16 and kinds.count("relu") == 2 + 32 + 4


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton (CPU-only platform)")
@pytest.mark.parametrize("channels_last", [True, False])
def test_folded_convolutions_without_cudnns_fused_call_add_bias_and_relu_in_one_pass(monkeypatch, channels_last):
    """Where cuDNN's fused call does not run (the image's 3-channel convolution; a layer cuDNN refused) a folded
    convolution with ReLU and no residual runs without its bias, then the bias and ReLU in one Triton pass on a
    channels-last map (here Triton's interpreter: INTERPRETER), with add_ / relu_ on an NCHW one; the logits stay the
    unfolded network's (float64, 1e-12). Without INTERPRETER on the CPU, as a user's CPU runs it, no pass."""
    calls, passes = [], []
    Fo, model = fake_cudnn(monkeypatch, calls)
    monkeypatch.setattr(Fo, "INTERPRETER", True)
    real = Fo.bias_relu
    monkeypatch.setattr(Fo, "bias_relu", lambda y, b: passes.append(tuple(y.shape[:2])) or real(y, b))
    x, _ = batch()
    x = x.double()
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)["out"]
        Fo.fold_batch_norm(model, torch.float64)
        out = model(x)["out"]
        assert rel(out, ref) < 1e-12
        kinds = [kind for kind, _ in calls]
        assert kinds.count("add_relu") == 16 and kinds.count("relu") == 2 + 32 + 4
        first = model.backbone.stem[0]
        assert passes == ([(x.shape[0], first.out_channels)] if channels_last else [])
        monkeypatch.setattr(Fo, "INTERPRETER", False)
        assert rel(model(x)["out"], ref) < 1e-12
    assert len(passes) == (1 if channels_last else 0)


def test_a_folded_layer_that_cudnn_refuses_runs_unfused(monkeypatch):
    """cuDNN without an engine for a fused call (here: the dilated layers, as a stand-in): that layer warns, runs
    F.conv2d + bias (+ residual) + ReLU from then on, and is not asked again; the logits stay the unfolded network's.
    Out of memory is not taken for a refusal."""
    calls = []
    Fo, model = fake_cudnn(monkeypatch, calls, refuse=lambda dilation: dilation > 1)
    x, _ = batch()
    with torch.no_grad():
        ref = model(x.double())["out"]
        Fo.fold_batch_norm(model, torch.float64)
        with pytest.warns(UserWarning, match=r"fused convolution \(cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\); that"):
            out = model(x.double())["out"]
        first = len(calls)
        again = model(x.double())["out"]
    refused = [m for m in model.modules() if getattr(m, "unfused", None)]
    dilated = sum(d > 1 for _, d in calls)
    assert rel(out, ref) < 1e-12 and torch.equal(again, out)
    assert len(refused) == dilated > 0  # each refused once, never asked again
    assert len(calls) - first == first - len(refused)

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", oom)
    with torch.no_grad(), pytest.raises(torch.cuda.OutOfMemoryError):
        model(x.double())


def test_channels_last_train_step_gradients_match():
    """In float64 (so that only a real difference of the computed function shows): NCHW vs NHWC train step."""
    x, y = batch()
    grads = []
    for cl in (False, True):
        model, xx = narrow_model(dtype=torch.float64).train(), x.double()
        if cl:
            model, xx = model.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(3)
        loss = L.fused_danet_loss(model(xx, resize=False), y)["loss"]
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-10


def test_bf16_autocast_output_close_to_float32():
    model = narrow_model().eval()
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)["out"]
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %); through ~60 layers the errors add up to a few
    # of those, well under 5 %; a broken cast (e.g. fp16 overflow, a layer left in the wrong dtype) lands far above
    assert low.dtype == torch.bfloat16
    assert rel(low.float(), ref) < 0.05
    assert (low.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_bf16_training_tracks_float32():
    """20 SGD steps from the same weights on the same batches and dropout masks: bf16 autocast vs float32.

    Tolerance: each loss is the float32 CE of bf16 logits, whose relative error is a few bf16 units (2^-8 each);
    the per-step loss therefore differs by a fraction of a percent (0.1-0.7 % measured) and the weights, updated
    with lr 0.01 from gradients of similar relative error, drift apart only slowly over 20 steps. 2 % per step (and
    0.6 % on average) is ~3x the deviation seen; a wrong bf16 path (unscaled, overflowing, NaN) breaks it.
    """
    base = narrow_model()
    data = [batch(seed=s) for s in range(4)]

    def run(amp: bool) -> list[float]:
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        losses = []
        for i in range(20):
            x, y = data[i % 4]
            torch.manual_seed(100 + i)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = L.fused_danet_loss(model(x, resize=False), y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fp32, bf16 = run(False), run(True)
    devs = [abs(a - b) / a for a, b in zip(fp32, bf16, strict=True)]
    assert max(devs) < 0.02 and sum(devs) / len(devs) < 0.006, devs
    assert sum(fp32[-4:]) < sum(fp32[:4])  # it trains (the same 4 batches, seen 5 times)


def test_winograd_training_drifts_like_float32(monkeypatch):
    """20 SGD steps as above, Winograd convolutions vs direct, both against a float64 run of the same steps.

    The narrow net amplifies any rounding over 20 steps (ReLU masks, train-mode BN at 4x4 maps): direct float32
    itself drifts ~0.5 % from float64 by step 20. Winograd's ~20x larger per-convolution rounding (still ~3e-6)
    must not drift much more (measured 0.7 %); a wrong gradient would be off by far more from the first step.
    """
    import danet.models.winograd as W

    monkeypatch.setattr(W, "MIN_CHANNELS", 1)
    base = narrow_model()
    data = [batch(seed=s) for s in range(4)]

    def run(mode: str) -> list[float]:
        model = copy.deepcopy(base).train()
        if mode == "winograd":
            assert W.use_winograd(model) > 15
        if mode == "f64":
            model.double()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        losses = []
        for i in range(20):
            x, y = data[i % 4]
            torch.manual_seed(100 + i)
            loss = L.fused_danet_loss(model(x.double() if mode == "f64" else x, resize=False), y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    f64, direct, wino = run("f64"), run("direct"), run("winograd")
    dev = lambda run: [abs(a - b) / a for a, b in zip(f64, run, strict=True)]  # noqa: E731
    assert dev(wino)[0] < 1e-5  # the first step: the same weights, only rounding
    assert max(dev(wino)) < 0.02 and max(dev(wino)) < 3 * max(dev(direct)) + 1e-3, (dev(wino), dev(direct))


def test_compile_of_a_submodule_matches_eager():
    """torch.compile (inductor, C++ on the CPU) of the channel attention; the whole model takes minutes here."""
    cam = narrow_model().head.cam
    x = torch.randn(2, 8, 5, 6)
    compiled = torch.compile(cam, fullgraph=True)
    assert rel(compiled(x), cam(x)) < 1e-6


# ----------------------------------------------------------------------------------------------- the tool
def test_run_case_figures_and_flops():
    spec = B.BenchSpec(preset="danet_tiny_synthetic", mode="train", batch=2, size=(32, 32), warmup=1, iters=2,
                       device="cpu", loss="fused")  # fmt: skip
    rec = B.run_case(spec)
    assert rec["ms"] > 0 and rec["img_s"] == pytest.approx(2000 / rec["ms"], rel=1e-2)
    assert 0 < rec["host_ms"] <= rec["ms"] * 1.01  # on the CPU a step returns when it is done
    assert rec["peak_gib"] > 0.05 and rec["mem_kind"] == "rss_high_water"
    assert rec["gflop_per_img"] > 0 and rec["tflop_s"] > 0 and rec["loss_value"] > 0
    infer = B.run_case(B.BenchSpec(preset="danet_tiny_synthetic", batch=2, size=(32, 32), warmup=0, iters=1))
    assert infer["gflop_per_img"] * 2 < rec["gflop_per_img"]  # forward < forward + backward


def test_peak_memory_of_graph_replays_counts_the_pools(monkeypatch):
    # a CUDA-graph replay allocates nothing: its activations live in the graph's pool, reserved but not allocated
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: 1 * B.GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev: 5 * B.GiB)
    cuda = torch.device("cuda")
    assert B._peak_gib(cuda) == 1 and B._peak_gib(cuda, pooled=True) == 5


def test_run_case_winograd_gives_the_direct_loss(monkeypatch):
    import danet.models.winograd as W

    monkeypatch.setattr(W, "MIN_CHANNELS", 1)  # the tiny preset has no 256-channel convolution to switch
    switched = []
    real = W.use_winograd
    monkeypatch.setattr(B, "use_winograd", lambda m, on=True: switched.append(real(m, on)) or switched[-1])
    base = dict(preset="danet_tiny_synthetic", mode="train", batch=2, size=(32, 32), warmup=0, iters=1, flops=False)
    direct = B.run_case(B.BenchSpec(**base))
    wino = B.run_case(B.BenchSpec(**base, conv="winograd"))
    assert switched[0] == 0 and switched[1] > 10 and wino["conv"] == "winograd"
    assert wino["loss_value"] == pytest.approx(direct["loss_value"], rel=1e-5)  # the first step: same weights, batch
    with pytest.raises(B.DanetError, match="--conv"):
        B.run_case(B.BenchSpec(**base, conv="fft"))


def test_benchmark_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [
        "benchmark",
        "danet_tiny_synthetic",
        "--size",
        "32",
        "32",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--train",
        "--amp",
        "bf16",
        "--channels-last",
        "--loss",
        "fused",
        "--attention",
        "explicit",
        "--json",
        str(out),
    ]
    assert main(args) == 0  # fmt: skip
    recs = json.loads(out.read_text())
    assert len(recs) == 1 and recs[0]["mode"] == "train" and recs[0]["amp"] == "bf16" and recs[0]["channels_last"]
    assert "img/s" in capsys.readouterr().out


def test_benchmark_cli_user_errors(capsys, tmp_path):
    assert main(["benchmark", "no_such_preset", "--iters", "1"]) == 2
    assert main(["benchmark", "danet_tiny_synthetic", "--set", "widht=3", "--iters", "1"]) == 2
    cpu_graphs = ["--cuda-graphs", "--device", "cpu", "--infer", "--size", "32", "32", "--no-flops"]
    assert main(["benchmark", "danet_tiny_synthetic", *cpu_graphs]) == 2
    train_graphs = ["--cuda-graphs", "--device", "cpu", "--train", "--size", "32", "32", "--no-flops"]
    assert main(["benchmark", "danet_tiny_synthetic", *train_graphs]) == 2
    assert main(["benchmark", "danet_tiny_synthetic", *train_graphs, "--amp", "fp16"]) == 2
    assert main(["benchmark", "danet_tiny_synthetic", *train_graphs[1:], "--norm", "folded"]) == 2
    small = ["--device", "cpu", "--size", "32", "32", "--no-flops", "--iters", "1", "--warmup", "0"]
    for bad in (["--seed", str(2**64)], ["--threads", str(5 * 10**9)], ["--batch", str(10**20)],
                ["--size", str(10**20), "16"], ["--norm", "folded", "--conv", "winograd"], ["--json", ""],
                ["--json", str(tmp_path / "nowhere") + "/"]):  # fmt: skip
        assert main(["benchmark", "danet_tiny_synthetic", *small, *bad]) == 2
    assert not (tmp_path / "nowhere").exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 13 and "Traceback" not in err
    assert "--cuda-graphs needs a CUDA device" in err and "GradScaler" in err and "--norm folded" in err
    assert "--seed must be in 0 .. 2**63 - 1" in err and "give one of them" in err and "--json needs a file" in err
    with pytest.raises(B.DanetError, match="unknown --head"):
        B.check_spec(B.BenchSpec(preset="danet_tiny_synthetic", head="sideways", device="cpu"))


def test_benchmark_folded_runs_inference_and_the_models_attention_is_kept(tmp_path, capsys):
    """`--norm folded` without --infer / --train times inference (as --slide); without --attention the model's
    `--set fused_attention=false` holds (the explicit product), where --attention names one it wins."""
    small = ["--device", "cpu", "--size", "32", "32", "--iters", "1", "--warmup", "0"]
    out = tmp_path / "r.json"
    assert main(["benchmark", "danet_tiny_synthetic", *small, "--norm", "folded", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())
    assert rec["mode"] == "infer" and rec["norm"] == "folded" and rec["gflop_per_img"] > 0 and rec["loss"] is None
    # folded in bf16 (the model's other layers float32): the FLOP count runs under the timed run's autocast too
    assert main(["benchmark", "danet_tiny_synthetic", *small, "--norm", "folded", "--amp", "bf16", "--json",
                 str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())[0]["gflop_per_img"] == rec["gflop_per_img"]
    sets = ["--infer", "--set", "fused_attention=false", "--json", str(out)]
    assert main(["benchmark", "danet_tiny_synthetic", *small, *sets]) == 0
    assert json.loads(out.read_text())[0]["attention"] == "explicit"
    assert main(["benchmark", "danet_tiny_synthetic", *small, *sets, "--attention", "fused"]) == 0
    assert json.loads(out.read_text())[0]["attention"] == "fused"
    assert "GFLOP/img" in capsys.readouterr().out


def test_benchmark_slide_counts_every_window(tmp_path, capsys):
    """`--slide`: sliding-window inference; the FLOPs are one window's times the number of windows."""
    common = ["benchmark", "danet_tiny_synthetic", "--size", "192", "320", "--iters", "1", "--warmup", "0"]
    whole, slide = tmp_path / "whole.json", tmp_path / "slide.json"
    assert main([*common, "--infer", "--size", "128", "128", "--json", str(whole)]) == 0
    windows = ["--slide", "128", "128", "--stride", "64", "96", "--window-batch", "2"]
    assert main([*common, *windows, "--json", str(slide)]) == 0
    (w,), (s,) = json.loads(whole.read_text()), json.loads(slide.read_text())
    assert s["mode"] == "infer" and s["slide"] == [128, 128] and s["stride"] == [64, 96] and s["window_batch"] == 2
    # rows (192 - 128 + 63) // 64 + 1 = 2, cols (320 - 128 + 95) // 96 + 1 = 3: six 128x128 windows
    assert w["gflop_per_img"] > 0.2
    assert s["gflop_per_img"] == pytest.approx(6 * w["gflop_per_img"], abs=7 * 0.005)  # both rounded to 0.01
    assert "slide=128x128 stride=64x96 windows/forward=2" in capsys.readouterr().out
    assert main([*common, "--slide", "32", "32", "--train"]) == 2
    assert main([*common, "--slide", "32", "32", "--window-batch", "0"]) == 2
    assert main([*common, "--slide", "0", "32"]) == 2
    assert capsys.readouterr().err.count("error:") == 3


def test_test_and_predict_take_norm_folded(checkpoint, tmp_path, capsys, monkeypatch):
    """`danet test` / `danet predict --norm folded` fold the batch norms (in the run's dtype: float32, bf16 under
    --amp bf16) and give the unfolded run's metrics and labels (float32 rounding); the JSON records the setting;
    --conv winograd beside it is refused in one line."""
    import numpy as np
    from PIL import Image

    import danet.models.folded as FD
    from danet.cli import main
    from danet.data import ensure_synthetic

    dtypes = []
    real = FD.fold_batch_norm
    monkeypatch.setattr(FD, "fold_batch_norm", lambda m, dtype=torch.float32: dtypes.append(dtype) or real(m, dtype))
    root = ensure_synthetic(tmp_path / "data")
    base = ["test", "danet_tiny_synthetic", "--checkpoint", str(checkpoint), "--data-root", str(root), "--limit", "3",
            "--no-progress"]  # fmt: skip
    runs = {"native": [], "folded": ["--norm", "folded"], "folded_bf16": ["--norm", "folded", "--amp", "bf16"]}
    res = {}
    for name, extra in runs.items():
        assert main([*base, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert dtypes == [torch.float32, torch.bfloat16]
    assert [res[n]["settings"]["norm"] for n in runs] == ["native", "folded", "folded"]
    assert abs(res["folded"]["aAcc"] - res["native"]["aAcc"]) < 0.05
    assert abs(res["folded_bf16"]["aAcc"] - res["native"]["aAcc"]) < 2.0
    image = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    labels = {}
    for name, extra in (("native", []), ("folded", ["--norm", "folded"])):
        out = tmp_path / f"pred_{name}"
        assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out), "--no-progress",
                     *extra]) == 0  # fmt: skip
        labels[name] = np.asarray(Image.open(next(out.glob("*.png"))))
    assert len(dtypes) == 3 and (labels["folded"] == labels["native"]).mean() > 0.99
    capsys.readouterr()
    for cmd in (base, ["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "p")]):
        assert main([*cmd, "--norm", "folded", "--conv", "winograd"]) == 2
        err = capsys.readouterr().err
        assert "--norm folded replaces the convolutions that --conv winograd would switch" in err
        assert len(err.strip().splitlines()) == 1
