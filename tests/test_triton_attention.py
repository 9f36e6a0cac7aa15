"""The position attention's Triton kernel (`attention="triton"`), run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): float64 to rounding of the explicit softmax(q k^T) v, bf16 / fp16 no further off than the
toolboxes' own explicit product in that dtype; the model takes it only where it should. Its sm_90 compile (no
register spills, 128-bit loads): tests/test_triton_compile.py."""

from __future__ import annotations

import json

import pytest
import torch

import danet
from danet.models.attention import attend, attend_explicit

pytest.importorskip("triton")
from danet.models.triton_attention import attend_triton  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    ("b", "n", "d", "c"),
    [(2, 150, 64, 512), (1, 70, 16, 32), (1, 65, 8, 40), (1, 1, 64, 64), (3, 200, 24, 300)],
)
def test_float64_equals_the_explicit_product(b, n, d, c):
    """Positions not a multiple of the blocks, query widths and value widths that are not powers of two (masked),
    one position, batches: float64 to rounding; inputs whose rows lie further apart (views into wider tensors, which
    reach the kernel as they are) and transposed ones (the projections of an NCHW map: copied first) give the same."""
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(b, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    out = attend_triton(q, k, v)
    assert out.shape == (b, n, c) and out.dtype == torch.float64 and out.stride(-1) == 1
    assert rel(out, attend_explicit(q, k, v)) < 1e-12
    wide = [torch.zeros(*t.shape[:2], t.shape[2] + 8, dtype=t.dtype) for t in (q, k, v)]
    for w, t in zip(wide, (q, k, v), strict=True):
        w[..., 3 : 3 + t.shape[2]] = t
    qs, ks, vs = (w[..., 3 : 3 + t.shape[2]] for w, t in zip(wide, (q, k, v), strict=True))
    assert qs.stride(1) == d + 8 and vs.stride(1) == c + 8
    assert torch.equal(attend_triton(qs, ks, vs), out)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # stride N on the last dim
    assert torch.equal(attend_triton(qt, kt, vt), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_no_further_off_than_the_explicit_product(dtype):
    """DANet's widths (q / k 64, v 512): against float64 of the same rounded inputs, no further off than the explicit
    product in that dtype (the toolboxes' own computation under autocast) plus one rounding of the dtype (NOTE:
    Triton's interpreter truncates to bf16 where a GPU rounds), and close to PyTorch's fused attention."""
    g = torch.Generator().manual_seed(0)
    q, k = ((0.3 * torch.randn(1, 300, 64, generator=g)).to(dtype) for _ in range(2))
    v = torch.randn(1, 300, 512, generator=g).to(dtype)
    ref = attend_explicit(q.double(), k.double(), v.double())
    ours = attend_triton(q, k, v)
    assert ours.dtype == dtype
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert rel(ours, ref) <= rel(attend_explicit(q, k, v), ref) + ulp and rel(ours, ref) < 1e-2
    assert rel(ours, attend(q, k, v)) < 1e-2


@pytest.mark.parametrize(("exp2", "lazy"), [(True, False), (False, True), (True, True)])
def test_exp2_and_lazy_rescaling_compute_the_same_function(monkeypatch, exp2, lazy):
    """The kernel's EXP2 / LAZY variants (timed on a GPU by benchmarks/gpu_suite.py), float64 to rounding: one query
    repeated, with energies laid out over the key steps (64 keys a step) so that every row's maximum grows by less
    than RESCALE_AT (+2: no rescale, exponentials up to e^2), then by far more (+20: a rescale), then not at all,
    in a partial last step; and random queries of two scales. bf16: no further from float64 than the default
    kernel plus one rounding; fp16 on the laid-out energies, also where only half the rows of a block grow: finite
    (a rescale bounds the exponentials)."""
    import danet.models.triton_attention as TA

    g = torch.Generator().manual_seed(1)
    b, n, d, c = 2, 64 * 4 + 9, 16, 48
    q = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    k = 0.05 * torch.randn(b, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    q1 = q[:, :1].expand(b, n, d).contiguous()
    step = torch.tensor([0.0, 2.0, 22.0, 22.0, 5.0], dtype=torch.float64).repeat_interleave(64)[:n]
    k1 = k + step[None, :, None] * q1 / q1.pow(2).sum(-1, keepdim=True)  # energies q1 . k1_j = q1 . k_j + step_j
    qb, kb, vb = (t.bfloat16() for t in (3 * q, 20 * k, v))
    ref = attend_explicit(qb.double(), kb.double(), vb.double())
    default_err = rel(TA.attend_triton(qb, kb, vb), ref)
    monkeypatch.setattr(TA, "EXP2_FMA", exp2)
    monkeypatch.setattr(TA, "LAZY_RESCALE", lazy)
    for qq, kk in ((q1, k1), (3 * q, 20 * k), (0.3 * q, 2 * k)):
        assert rel(TA.attend_triton(qq, kk, v), attend_explicit(qq, kk, v)) < 1e-12
    assert rel(TA.attend_triton(qb, kb, vb), ref) <= default_err + 2**-8
    qh, kh, vh = (t.half() for t in (q1, k1, v))  # fp16 (largest 65,504): the exponentials stay bounded (not e^22)
    ours = TA.attend_triton(qh, kh, vh)
    assert torch.isfinite(ours).all() and rel(ours, attend_explicit(qh.double(), kh.double(), vh.double())) < 1e-2
    # rows of one block apart: half of every 128 queries grow by +22 (q1's), the other half (orthogonal to q1) not
    # at all; ANY row's growth must rescale (fp16: e^22 would overflow), N a multiple of the blocks
    n2 = 256
    other = (
        q[:, 1:2] - (q[:, 1:2] * q1[:, :1]).sum(-1, keepdim=True) / q1[:, :1].pow(2).sum(-1, keepdim=True) * q1[:, :1]
    )
    rows = torch.arange(n2) % 128 < 64
    q2 = torch.where(rows[None, :, None], q1[:, :1], other).expand(b, n2, d)
    k2, v2 = k1[:, :n2], v[:, :n2]
    ours = TA.attend_triton(*(t.half() for t in (q2, k2, v2)))
    ref2 = attend_explicit(*(t.half().double() for t in (q2, k2, v2)))
    assert torch.isfinite(ours).all() and rel(ours, ref2) < 1e-2


def test_the_fused_residual_adds_gamma_times_the_attention_to_x():
    """RESIDUAL (`FUSE_RESIDUAL`): gamma * softmax(q k^T) v + x in the kernel, float64 to rounding, x contiguous in
    C or with rows further apart; bf16 no further from float64 than the addcmul after the kernel plus one rounding;
    the arguments are checked."""
    g = torch.Generator().manual_seed(3)
    b, n, d, c = 2, 150, 16, 40
    q, k = (torch.randn(b, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v, x = (torch.randn(b, n, c, generator=g, dtype=torch.float64) for _ in range(2))
    gamma = torch.tensor(0.7, dtype=torch.float64)
    ref = gamma * attend_explicit(q, k, v) + x
    assert rel(attend_triton(q, k, v, x, gamma), ref) < 1e-12
    wide = torch.zeros(b, n, c + 8, dtype=torch.float64)
    wide[..., 5 : 5 + c] = x
    assert torch.equal(attend_triton(q, k, v, wide[..., 5 : 5 + c], gamma), attend_triton(q, k, v, x, gamma))
    h = [t.bfloat16() for t in (q, k, v, x)]
    ref_h = gamma * attend_explicit(*(t.double() for t in h[:3])) + h[3].double()
    apart = torch.addcmul(h[3], attend_triton(*h[:3]), gamma.to(torch.bfloat16))
    fused = attend_triton(*h, gamma.float())
    assert fused.dtype == torch.bfloat16 and rel(fused, ref_h) <= rel(apart, ref_h) + 2**-8
    with pytest.raises(ValueError, match="both residual and gamma"):
        attend_triton(q, k, v, x)
    with pytest.raises(ValueError, match="shaped and typed as v"):
        attend_triton(q, k, v, x.float(), gamma)


def test_the_module_fuses_the_residual_on_channels_last_maps_only(monkeypatch):
    """FUSE_RESIDUAL: the position attention's output from the kernel's epilogue on a channels-last map (bf16, within
    rounding of the addcmul's, not the same bits); an NCHW map keeps the addcmul (its rows are not contiguous in C)."""
    import danet.models.triton_attention as TA

    model = narrow_model()
    model.set_attention("triton")
    pam = model.head.pam
    x = torch.randn(1, pam.value_project.in_channels, 12, 10)
    fused = []
    real = TA.attend_triton
    monkeypatch.setattr(TA, "attend_triton", lambda *a: fused.append(len(a) == 5) or real(*a))
    outs = {}
    for fuse in (False, True):
        monkeypatch.setattr(TA, "FUSE_RESIDUAL", fuse)
        for cl in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            m = pam.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                outs[fuse, cl] = m(xi.bfloat16())
    assert fused == [False, False, False, True]
    assert outs[True, True].is_contiguous(memory_format=torch.channels_last)
    a, b = outs[True, True].double(), outs[False, True].double()
    assert rel(a, b) < 1e-2 and not torch.equal(a, b)
    assert torch.equal(outs[True, False], outs[False, False])


def narrow_model():
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=32,
                               key_channels=16, aux_channels=16).eval()  # fmt: skip
    for p in model.head.parameters():  # gamma 0 (the init) would hide the attention's output
        if p.dim() == 0:
            p.data.fill_(0.7)
    return model


def test_the_model_runs_the_kernel_only_in_half_precision_inference(monkeypatch):
    """set_attention("triton"): a bf16 forward without gradients takes the kernel, with logits within bf16 rounding
    of the fused path's; float32, or a forward with gradients (training), keeps the fused path; an unknown name is
    refused."""
    import danet.models.triton_attention as TA

    calls = []
    real = TA.attend_triton
    monkeypatch.setattr(TA, "attend_triton", lambda *a: calls.append(a[2].dtype) or real(*a))
    model = narrow_model()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x)["out"].float()
        model.set_attention("triton")
        ours = model(x)["out"].float()
    assert calls == [torch.bfloat16] and model.head.pam.fused and model.head.pam.triton
    assert rel(ours, fused) < 2e-2
    with torch.no_grad():
        model(x)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # gradients on
    assert calls == [torch.bfloat16]
    model.set_attention("explicit")
    assert not model.head.pam.fused and not model.head.pam.triton
    with pytest.raises(danet.DanetError, match="unknown attention 'flash'; use fused, explicit, triton"):
        model.set_attention("flash")
    import danet.models.attention as A

    model.set_attention("triton")
    monkeypatch.setattr(A, "triton", None)  # a PyTorch build without Triton: the fused path, no failure
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x)["out"], model.eval()(x)["out"])
    assert calls == [torch.bfloat16]


def test_test_and_benchmark_commands_take_it_or_say_why_not(checkpoint, tmp_path, capsys, monkeypatch):
    """`danet test --attention triton --amp bf16` runs the kernel (the JSON says so; the metrics those of the fused
    path to bf16 rounding); without bf16 / fp16 it notes that the fused attention runs, and the JSON records that;
    without --attention the model's own path runs; `danet benchmark` refuses it for training, in float32 and under
    --compile."""
    import danet.models.triton_attention as TA
    from danet.cli import main
    from danet.data import ensure_synthetic

    calls = []
    real = TA.attend_triton
    monkeypatch.setattr(TA, "attend_triton", lambda *a: calls.append(1) or real(*a))

    root = ensure_synthetic(tmp_path / "data")
    base = ["test", "danet_tiny_synthetic", "--checkpoint", str(checkpoint), "--data-root", str(root), "--limit",
            "2", "--no-progress"]  # fmt: skip
    results, ran = {}, {}
    runs = {"fused": ["--amp", "bf16"], "triton": ["--amp", "bf16", "--attention", "triton"],
            "f32": ["--attention", "triton"], "explicit": ["--amp", "bf16", "--attention", "explicit"]}  # fmt: skip
    for name, extra in runs.items():
        calls.clear()
        assert main([*base, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name], ran[name] = json.loads((tmp_path / f"{name}.json").read_text()), bool(calls)
    assert "note: --attention triton runs in bf16 / fp16 (add --amp bf16)" in capsys.readouterr().err
    assert ran == {"fused": False, "triton": True, "f32": False, "explicit": False}
    assert [results[n]["settings"]["attention"] for n in ran] == ["fused", "triton", "fused", "explicit"]
    assert abs(results["triton"]["aAcc"] - results["fused"]["aAcc"]) < 1.0
    bench = ["benchmark", "danet_tiny_synthetic", "--size", "32", "32", "--attention", "triton", "--device", "cpu"]
    assert main([*bench, "--train", "--amp", "bf16"]) == 2
    assert "--attention triton runs in inference only" in capsys.readouterr().err
    assert main(bench) == 2
    assert "--attention triton runs in bf16 / fp16" in capsys.readouterr().err
    assert main([*bench, "--amp", "bf16", "--compile"]) == 2
    assert "--attention triton is not traced by --compile" in capsys.readouterr().err
