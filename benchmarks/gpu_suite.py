#!/usr/bin/env python
"""This project's GPU measurements, one JSON line per case (also appended to $OUT/ours.jsonl; $OUT defaults to
/tmp/danet-gpu-out, as in gpu_bench.sh).

Groups (the default order; each case starts only while the time budget lasts):
  sys      bf16 matrix rate (8192^3 matmul) and device-to-device copy bandwidth: the card's two ceilings
  loss     the training loss alone (reference, fused GEMM / aten paths, compiled) and its parts' kernels
  norm     batch norm + ReLU [+ residual], forward + backward: PyTorch's kernels vs the fused Triton ones
  train    R50-D8 ADE20K 512x512 batch 8 train step: fp32 / bf16 / fp16, channels_last, loss implementations
  fidelity 20 steps of the fastest settings against float32 from the same weights and batches: loss deviations
  e2e      the real loop, `danet train danet_r50-d8_ade20k` in this process (data loader, augmentation, logging) on
           ADE20K-layout JPEGs written to $E2E_DATA (default /tmp/danet-e2e-data), batch 8, bf16, channels_last,
           fused loss triton | compiled | chunked, fused batch norm, whole-network compile, no prefetch: images/s
           after a warm-up, data wait, peak memory
  profile  torch.profiler's top CUDA kernels of the Triton-loss train cases (batch norm native, Triton)
           -> $OUT/profile.txt
  eval     evaluation over an ADE20K-layout val split: images read in this process vs by reader processes
  infer    R50-D8 inference: sliding windows over 1024x2048 (one per forward vs stacked), 512x512 batch 1 (ADE20K)
           and whole 1024x2048 (Cityscapes): dtypes, CUDA graphs
  compile  torch.compile cases (slow to build: last)
  pam      (on request) the PAM core softmax(q k^T) v, q/k 64 wide, v 512 wide: explicit vs SDPA vs Triton variants
  head     (on request) the head's branches on two CUDA streams (the default in inference) against one after the
           other: the same logits? (eager and graph-replayed; 512x512 and whole 1024x2048, bf16 and float32); the
           attention kernel's exp2 + lazy rescaling and the folded network: how far their logits move
  resize   (on request) the logits' final bilinear resize: PyTorch's NHWC kernel vs `upsample_logits` (NCHW): ms, bits
  convs    (on request) each distinct convolution of the folded network on a whole image, with its batch norm's work
           run each way (plain + Triton batch norm, folded + bias/ReLU, cuDNN's fused call, cuBLASLt's epilogue); the
           stem's max pooling, PyTorch's vs the Triton kernel

--smoke runs every group on the CPU at tiny sizes (checks the script, not the speed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from danet.benchmark import BenchSpec, release, run_case  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/danet-gpu-out"))  # as gpu_bench.sh; not the working tree (a run's files)
T0 = time.time()


def emit(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with open(OUT / "ours.jsonl", "a") as f:
        f.write(line + "\n")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, warmup: int, iters: int) -> float:
    """Median seconds of fn (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------- sys
def group_sys(a) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 512 if a.smoke else 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    s = bench(lambda: x @ y, 3, 10)
    emit(
        {
            "group": "sys",
            "name": "matmul_bf16",
            "n": n,
            "ms": round(1e3 * s, 3),
            "tflop_s": round(2 * n**3 / s / 1e12, 1),
        }
    )
    big = torch.empty(2**28 if not a.smoke else 2**20, device=dev)  # 1 GiB of float32
    dst = torch.empty_like(big)
    s = bench(lambda: dst.copy_(big), 3, 10)
    emit(
        {
            "group": "sys",
            "name": "copy",
            "gib": big.numel() * 4 / 2**30,
            "tb_s": round(2 * big.numel() * 4 / s / 1e12, 2),
        }
    )


# ------------------------------------------------------------------------------------------------- pam
def pam_impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import danet.models.triton_attention as TA
    from danet.models.attention import attend, attend_explicit

    def triton_blocks(block_m, block_c, warps, block_n=TA.BLOCK_N, stages=None, exp2=False, lazy=False):
        def run(q, k, v):  # other blocks and flags (forward only)
            settings = dict(BLOCK_M=block_m, MAX_BLOCK_C=block_c, NUM_WARPS=warps, BLOCK_N=block_n,
                            NUM_STAGES=stages, EXP2_FMA=exp2, LAZY_RESCALE=lazy)  # fmt: skip
            with module_settings("triton_attention", **settings):
                return TA.attend_triton(q, k, v)

        return run

    def heads(q, k, v, h, backend=None):  # v split into h heads sharing q and k
        b, n, d = q.shape
        vh = v.reshape(b, n, h, -1).transpose(1, 2)
        qh, kh = q[:, None].expand(b, h, n, d), k[:, None].expand(b, h, n, d)
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)
        return o.transpose(1, 2).reshape(b, n, -1)

    return {
        "explicit": attend_explicit,
        "split8_default": attend,  # the model's fused path
        "split8_flash": lambda q, k, v: heads(q, k, v, 8, SDPBackend.FLASH_ATTENTION),
        "split8_cudnn": lambda q, k, v: heads(q, k, v, 8, SDPBackend.CUDNN_ATTENTION),
        "split8_efficient": lambda q, k, v: heads(q, k, v, 8, SDPBackend.EFFICIENT_ATTENTION),
        "heads4x128_efficient": lambda q, k, v: heads(q, k, v, 4, SDPBackend.EFFICIENT_ATTENTION),
        "heads2x256_efficient": lambda q, k, v: heads(q, k, v, 2, SDPBackend.EFFICIENT_ATTENTION),
        "onehead512_default": lambda q, k, v: heads(q, k, v, 1),
        # forward only (inference): the model's blocks (128 queries x 256 channels, 8 warps), then one program per
        # 64 queries over all 512 channels (q k^T once; no spills on sm_90 either) and 128 x 128
        "triton": TA.attend_triton,
        "triton_m64_c512": triton_blocks(64, 512, 8),
        "triton_m128_c128": triton_blocks(128, 128, 8),
        # the model's blocks with other key steps, pipelining depths and warps (the whole image's attention: 2.92 ms,
        # ~470 TFLOP/s, in the 4th H200 session; 600 would take 0.6 ms off)
        "triton_n128": triton_blocks(128, 256, 8, block_n=128),
        "triton_n32": triton_blocks(128, 256, 8, block_n=32),
        "triton_s2": triton_blocks(128, 256, 8, stages=2),
        "triton_s4": triton_blocks(128, 256, 8, stages=4),
        "triton_w4_m64": triton_blocks(64, 256, 4),
        # the exponentials as exp2 of one fused multiply-add (-1 of ~4 FP32 operations an element) and the
        # accumulator rescaled only when a row's maximum grows by more than 5.5, a factor e^5.5 (-32,768
        # multiplications a key step of ~5.2 MFLOP of MMA): the model's blocks, then all 512 channels a program (q k^T
        # and its exponentials once; 240-254 registers, no spills, 229 KB of shared memory on sm_90)
        "triton_exp2": triton_blocks(128, 256, 8, exp2=True),
        "triton_lazy": triton_blocks(128, 256, 8, lazy=True),
        "triton_lazy_exp2": triton_blocks(128, 256, 8, exp2=True, lazy=True),
        "triton_m64_c512_lazy_exp2": triton_blocks(64, 512, 8, exp2=True, lazy=True),
    }


@contextlib.contextmanager
def module_settings(module: str, **settings):
    """`danet.models.<module>`'s module-level settings for the duration (the attention kernel's blocks, warps,
    EXP2_FMA, LAZY_RESCALE; the pooling kernel's ENABLED): for the `pam` group's variants and the model cases that
    CASE_SETTINGS names."""
    import importlib

    mod = importlib.import_module(f"danet.models.{module}")
    saved = {n: getattr(mod, n) for n in settings}
    for n, value in settings.items():
        setattr(mod, n, value)
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(mod, n, value)


def pam_shape(dev: str, b: int, n: int, dtype: torch.dtype, smoke: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, n, 64, generator=g).to(dev, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, n, 512, generator=g).to(dev, dtype).requires_grad_()
    go = torch.randn(b, n, 512, generator=g).to(dev, dtype)
    ref = None
    if n <= 4096:
        with torch.no_grad():
            ref = torch.softmax(q.double() @ k.double().transpose(1, 2), -1) @ v.double()
    for name, fn in pam_impls().items():
        if smoke and name.endswith(("_flash", "_cudnn", "_efficient")):
            continue
        if name.startswith("triton") and (dtype == torch.float32 or (dev != "cuda" and not smoke)):
            continue  # bf16 / fp16 kernels (the smoke runs them through the interpreter)
        rec = {"group": "pam", "impl": name, "dtype": str(dtype)[6:], "batch": b, "n": n}

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v)

        def fwd_bwd(fn=fn):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(go)

        try:
            if ref is not None:
                rec["rel_err_vs_f64"] = float((fwd().double() - ref).norm() / ref.norm())
            peak_reset()
            rec["ms_fwd"] = round(1e3 * bench(fwd, 2, 5), 3)
            rec["peak_gib_fwd"] = peak_gib()
            if name.startswith("triton"):  # no backward: inference only
                emit(rec)
                continue
            peak_reset()
            rec["ms_fwd_bwd"] = round(1e3 * bench(fwd_bwd, 2, 5), 3)
            rec["peak_gib_fwd_bwd"] = peak_gib()
        except Exception as e:  # noqa: BLE001  (unsupported backend, OOM)
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        q.grad = k.grad = v.grad = None
        emit(rec)


def group_pam(a) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for b, n in [(1, 64)] if a.smoke else [(8, 4096), (1, 32768)]:
        for dtype in (torch.bfloat16, torch.float32):
            pam_shape(dev, b, n, dtype, a.smoke)
            peak_reset()


# ------------------------------------------------------------------------------------------------- loss
def group_loss(a) -> None:
    """The training loss alone, B=8, 4 outputs of (150, 64, 64) in bf16 (as under autocast) -> 512x512, fwd+bwd;
    and its parts on one (1, 150, 64, 64) output: aten's upsample and adjoint (NCHW, NHWC) vs the GEMM ones."""
    import danet.engine.fused_loss as L
    from danet.engine.losses import danet_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, k, h, w, s = (1, 5, 2, 2, 8) if a.smoke else (8, 150, 64, 64, 8)  # smoke: Triton's CPU interpreter is slow
    size = (h * s, w * s)
    g = torch.Generator().manual_seed(0)
    outs = {n: torch.randn(b, k, h, w, generator=g).to(dev, torch.bfloat16).requires_grad_() for n in L.WEIGHTS}
    y = torch.randint(0, k, (b, *size), generator=g)
    y[torch.rand(b, *size, generator=g) < 0.1] = 255
    y = y.to(dev)

    def reference():
        up = {n: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for n, v in outs.items()}
        danet_loss(up, y)["loss"].backward()

    def fused(impl="chunked", path="cuda"):
        def run():
            old, L.GEMM_PATH = L.GEMM_PATH, path
            try:
                L.fused_danet_loss(outs, y, impl=impl)["loss"].backward()
            finally:
                L.GEMM_PATH = old

        return run

    impls = {"reference": reference, "fused_gemm": fused(), "fused_aten": fused(path="never"),
             "compiled": fused("compiled"), "triton": fused("triton")}  # fmt: skip

    def value_and_grads(fn) -> torch.Tensor:  # the gradients of one fwd+bwd, flattened
        for v in outs.values():
            v.grad = None
        fn()
        grads = torch.cat([v.grad.float().flatten() for v in outs.values()])
        for v in outs.values():
            v.grad = None
        return grads

    base = None
    for name, fn in impls.items():
        rec = {"group": "loss", "impl": name, "batch": b, "classes": k, "size": list(size)}
        try:
            fn()  # compile / warm
            peak_reset()
            rec["ms_fwd_bwd"] = round(1e3 * bench(fn, 2, 5), 3)
            rec["peak_gib"] = peak_gib()
            grads = value_and_grads(fn)  # same values as the first implementation (the reference)?
            base = grads if base is None else base
            rec["grad_rel_vs_reference"] = float((grads - base).norm() / base.norm())
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        for v in outs.values():
            v.grad = None
        emit(rec)
    z = torch.randn(1, k, h, w, generator=g).to(dev)
    zl, zn = z.contiguous(memory_format=torch.channels_last), z[0].permute(1, 2, 0).contiguous()
    gy = torch.randn(1, k, *size, generator=g).to(dev)
    gl, gn = gy.contiguous(memory_format=torch.channels_last), gy[0].permute(1, 2, 0).reshape(-1, k).contiguous()
    flat = gn.clone()
    tt = y[0].reshape(-1)
    parts = {
        "upsample_aten_nchw": lambda: F.interpolate(z, size=size, mode="bilinear", align_corners=False),
        "upsample_aten_nhwc": lambda: F.interpolate(zl, size=size, mode="bilinear", align_corners=False),
        "upsample_gemm": lambda: L.upsample_nhwc(zn, s, s),
        "adjoint_aten_nchw": lambda: torch.ops.aten.upsample_bilinear2d_backward(gy, size, z.shape, False),
        "adjoint_aten_nhwc": lambda: torch.ops.aten.upsample_bilinear2d_backward(gl, size, z.shape, False),
        "adjoint_gemm": lambda: L.upsample_nhwc_adjoint(gn, h, w, s, s),
        "log_softmax_rows": lambda: torch.log_softmax(flat, 1),
        "nll_loss_sum": lambda: F.nll_loss(flat, tt, ignore_index=255, reduction="sum"),
        "gather_sum": lambda: flat.gather(1, torch.where(tt != 255, tt, 0)[:, None]).sum(),
    }
    for name, fn in parts.items():
        emit({"group": "loss_part", "part": name, "shape": [1, k, *size], "ms": round(1e3 * bench(fn, 3, 10), 4)})


# ------------------------------------------------------------------------------------------------- norm
def group_norm(a) -> None:
    """Batch norm + ReLU [+ residual] in training mode, forward + backward (dx, dweight, dbias): PyTorch's kernels
    vs the fused Triton ones (models/fused_norm.py), bf16 channels_last at R50-D8's batch-8 shapes; each one's
    values against float64, and the rate at which the fused kernels move their minimal bytes (x read 4 times, dy
    twice, y and dx written once; + the residual read and its gradient written)."""
    from danet.models.fused_norm import FusedBatchNorm2d, bn_relu

    dev = "cpu" if a.smoke else "cuda"
    shapes = [(2, 8, 8, 8), (2, 16, 4, 4)] if a.smoke else [(8, 64, 128, 128), (8, 512, 64, 64), (8, 2048, 64, 64)]
    relu = torch.nn.ReLU(inplace=True)
    for shape in shapes:
        for res in (False, True):
            g = torch.Generator().manual_seed(0)
            x64, r64, dy64 = ((torch.randn(shape, generator=g) * 2 + 0.5).to(dev).double() for _ in range(3))
            ref = torch.nn.BatchNorm2d(shape[1]).to(dev).double()
            xr = x64.clone().requires_grad_()
            want = torch.autograd.grad(bn_relu(ref, xr, relu, r64 if res else None), (xr, ref.weight), dy64)
            rec = {"group": "norm", "shape": list(shape), "residual": res, "dtype": "bfloat16", "channels_last": True}
            for impl in ("native", "triton"):
                try:
                    bn = torch.nn.BatchNorm2d(shape[1]).to(dev)
                    if impl == "triton":
                        bn.__class__ = FusedBatchNorm2d
                    cl = lambda t: t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)  # noqa: E731
                    x = cl(x64).requires_grad_()
                    r, dy = (cl(r64) if res else None), cl(dy64)

                    def step(bn=bn, x=x, r=r, dy=dy):
                        return torch.autograd.grad(bn_relu(bn, x, relu, r), (x, bn.weight), dy)

                    dx, dw = step()
                    rec[f"{impl}_ms"] = round(1e3 * bench(step, 3, 20), 4)
                    rec[f"{impl}_dx_rel"] = float((dx.double() - want[0]).norm() / want[0].norm())
                    rec[f"{impl}_dw_rel"] = float((dw.double() - want[1]).norm() / want[1].norm())
                except Exception as e:  # noqa: BLE001
                    rec[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            passes = 8 + (3 if res else 0)
            if "triton_ms" in rec:
                rec["triton_tb_s"] = round(passes * x64.numel() * 2 / rec["triton_ms"] / 1e9, 3)
            emit(rec)


# ------------------------------------------------------------------------------------------------- model cases
def cases(a, group: str) -> list[BenchSpec]:
    sm, gpu = a.smoke, not a.smoke
    ade, city = "danet_r50-d8_ade20k", "danet_r50-d8_cityscapes"
    # smoke: the same R50-D8 structure a few channels wide, so that the CPU gets through every case quickly
    nar = dict(base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16) if sm else {}
    mm = {**nar, "pam_bias": True, "aux_channels": 16 if sm else 256}
    common = dict(cudnn_benchmark=gpu, overrides=nar)  # (the CPU refuses the CUDA setting)
    tr = dict(common, preset=ade, mode="train", batch=2 if sm else 8, size=(32, 32) if sm else (512, 512),
              warmup=1 if sm else 3, iters=1 if sm else 10)  # fmt: skip
    i5 = dict(common, preset=ade, mode="infer", batch=1, size=(64, 64) if sm else (512, 512),
              warmup=1 if sm else 5, iters=1 if sm else 20)  # fmt: skip
    wh = dict(common, preset=city, mode="infer", batch=1, size=(64, 128) if sm else (1024, 2048),
              warmup=1 if sm else 3, iters=1 if sm else 10)  # fmt: skip
    bf, cl = dict(amp="bf16", channels_last=True), dict(amp="fp16", channels_last=True)
    tp = dict(bf, cuda_graphs=gpu, attention="triton")  # the fastest inference settings (with a norm)
    spec = lambda base, label, **kw: BenchSpec(**{**base, **kw}, label=label)  # noqa: E731
    if group == "train":
        return [
            # the most telling first: the budget may end the group early (earlier runs measured the rest); the
            # fastest measured (H200, 2026-11-26): the Triton loss and batch norm, the step replayed as a CUDA graph
            spec(tr, "train_bf16_cl_tritonloss_tritonbn_graphs", **bf, loss="triton", norm="triton", cuda_graphs=gpu),
            spec(tr, "train_bf16_cl_tritonloss_graphs", **bf, loss="triton", cuda_graphs=gpu),
            spec(tr, "train_bf16_cl_tritonloss", **bf, loss="triton"),
            spec(tr, "train_bf16_cl_tritonloss_tritonbn", **bf, loss="triton", norm="triton"),
            spec(tr, "train_bf16_cl_compiledloss", **bf, loss="compiled"),
            spec(tr, "train_bf16_cl_fusedloss", **bf, loss="fused"),
            spec(tr, "train_bf16_cl_refloss", **bf),
            spec(tr, "train_fp32_plain"),
            spec(tr, "train_fp32_fusedloss", loss="fused"),
            spec(tr, "train_fp16_cl_fusedloss", **cl, loss="fused"),
            spec(tr, "train_bf16_cl_fusedloss_mmlayout", **bf, loss="fused", overrides=mm),
        ]
    if group == "infer":
        win = dict(slide=(32, 64) if sm else (512, 1024))  # mmseg's Cityscapes slide window, stride 2/3: 9 windows
        return [
            # sliding windows, one per forward (as both toolboxes) vs stacked: 4 per forward (the default on a GPU)
            # and all 9; predicted: one at a time is bound by kernel launches (~9 ms a forward, ~85 ms in all),
            # stacked ~30-35 ms
            spec(wh, "slide_bf16_cl_w1", **bf, **win, window_batch=1),
            spec(wh, "slide_bf16_cl_auto", **bf, **win),
            spec(wh, "slide_bf16_cl_w9", **bf, **win, window_batch=9),
            spec(wh, "slide_bf16_cl_auto_graphs", **bf, **win, cuda_graphs=gpu),
            spec(i5, "infer512_fp32"),
            spec(i5, "infer512_fp32_graphs", cuda_graphs=gpu),
            spec(i5, "infer512_bf16_cl_graphs", **bf, cuda_graphs=gpu),
            spec(i5, "infer512_bf16_cl_graphs_tritonbn", **bf, cuda_graphs=gpu, norm="triton"),
            # the attention's Triton kernel (q k^T twice, not 8 times): measured whole image 11.96 -> 10.28 ms (4th
            # H200 session); the head's branches there on two CUDA streams (the default in CUDA inference since then;
            # `_serial`: one after the other, 512x512 b1 1.83 vs 1.95 ms); batch norm folded into the convolutions,
            # each run with its bias, residual and ReLU in one cuDNN call (`folded`, models/folded.py): predicted with
            # the NCHW resize 512x512 ~1.2 ms, whole ~8.5 ms, if cuDNN's fused kernels are as fast as its plain ones
            spec(i5, "infer512_bf16_cl_graphs_tritonbn_tritonpam", **tp, norm="triton"),
            spec(i5, "infer512_bf16_cl_graphs_folded_tritonpam", **tp, norm="folded"),
            spec(i5, "infer512_bf16_cl_graphs_tritonbn_tritonpam_serial", **tp, norm="triton", head="serial"),
            spec(i5, "infer512_fp16_graphs", amp="fp16", cuda_graphs=gpu),
            spec(wh, "whole_fp32"),
            spec(wh, "whole_bf16_cl", **bf),
            spec(wh, "whole_bf16_cl_graphs", **bf, cuda_graphs=gpu),
            spec(wh, "whole_bf16_cl_graphs_tritonbn", **bf, cuda_graphs=gpu, norm="triton"),
            spec(wh, "whole_bf16_cl_graphs_tritonbn_tritonpam", **tp, norm="triton"),
            spec(wh, "whole_bf16_cl_graphs_folded_tritonpam", **tp, norm="folded"),
            spec(wh, "whole_bf16_cl_graphs_tritonbn_tritonpam_serial", **tp, norm="triton", head="serial"),
            spec(wh, "whole_fp16_graphs", amp="fp16", cuda_graphs=gpu),
            # the defaults since 2026-11-27 (the attention kernel's exp2 and fused residual, the channel attention's
            # residual in its product, the pooling and resize kernels, the folded model's weights all in bf16, the
            # image's convolution's bias and ReLU in one pass; the head's branches side by side on small maps only:
            # measured on an H200, the folded whole image 8.46 -> 7.92 ms before the last two) against the earlier ones
            # (`_olddefaults`), one left out (`_noup`, `_nopool`), the head's branches always side by side (`_streams`)
            # or never (`_serial`); measured and dropped: the head's first convolutions' bias and ReLU apart from
            # cuDNN's call (7.96 vs 7.92), the attention kernel's keys in steps of 128 (8.62)
            *[
                spec(base, f"{name}_{variant}", **tp, norm="folded", head=HEAD_OF.get(variant, "auto"))
                for base, name in (
                    (wh, "whole_bf16_cl_graphs_folded_tritonpam"),
                    (i5, "infer512_bf16_cl_graphs_folded_tritonpam"),
                )
                for variant in ("olddefaults", "noup", "nopool", "streams", "serial")
            ],
        ]
    if group == "compile":
        return [  # the most telling first
            spec(tr, "train_bf16_cl_tritonloss_compile", **bf, loss="triton", compile="default"),
            # CUDA graphs of the compiled forward + backward too (launch overhead of ~1,000 kernels a step)
            spec(tr, "train_bf16_cl_tritonloss_compile_ro", **bf, loss="triton", compile="reduce-overhead"),
            spec(tr, "train_bf16_cl_compiledloss_compile", **bf, loss="compiled", compile="default"),
            spec(tr, "train_bf16_cl_fusedloss_compile", **bf, loss="fused", compile="default"),
            spec(i5, "infer512_bf16_cl_compile_graphs", **bf, compile="default", cuda_graphs=gpu),
        ]
    raise ValueError(group)


# model cases whose label contains a key: those module settings (module_settings) while they are built, captured, run
CASE_SETTINGS = {
    "_olddefaults": [("triton_attention", dict(EXP2_FMA=False, FUSE_RESIDUAL=False)),
                     ("attention", dict(GEMM_RESIDUAL=False)), ("triton_pool", dict(ENABLED=False)),
                     ("triton_resize", dict(ENABLED=False))],
    "_noup": [("triton_resize", dict(ENABLED=False))],
    "_nopool": [("triton_pool", dict(ENABLED=False))],
}  # fmt: skip
HEAD_OF = {"olddefaults": "streams", "streams": "streams", "serial": "serial"}  # the head's branches (DAHead)


def case_settings(label: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for key, modules in CASE_SETTINGS.items():
        if key in label:
            for module, settings in modules:
                stack.enter_context(module_settings(module, **settings))
    return stack


def group_model(a, group: str) -> None:
    flops_seen: dict = {}
    for spec in cases(a, group):
        if a.only and not any(o in spec.label for o in a.only):
            continue
        if time.time() - T0 > a.budget_s:
            emit({"group": group, "label": spec.label, "skipped": "time budget"})
            continue
        # the sliding-window cases count every window's FLOPs: the key keeps them apart from the whole image's
        key = (spec.preset, spec.mode, spec.size, spec.slide, spec.stride, tuple(sorted(spec.overrides.items())))
        spec.flops = key not in flops_seen
        if spec.device == "auto" and a.smoke:
            spec.device = "cpu"
        t = time.time()
        try:
            with case_settings(spec.label):
                rec = run_case(spec)
            if spec.flops:
                flops_seen[key] = rec["gflop_per_img"]
            else:
                rec["gflop_per_img"] = flops_seen[key]
                rec["tflop_s"] = round(flops_seen[key] * rec["img_s"] / 1e3, 3)
        except Exception as e:  # noqa: BLE001  (OOM, compile failure: record it and go on)
            rec = {
                "label": spec.label,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            }
            traceback.print_exc()
        rec.update(group=group, wall_s=round(time.time() - t, 1))
        rec.pop("ms_all", None) if not a.smoke else None
        emit(rec)
        release(compiled=bool(spec.compile))


# ------------------------------------------------------------------------------------------------- profile
def group_profile(a) -> None:
    from torch.profiler import ProfilerActivity, profile

    from danet.benchmark import build, make_infer_fn, make_train_fn, resolve_device

    dev = resolve_device("cpu" if a.smoke else "auto")
    torch.backends.cudnn.benchmark = True
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    out = []
    chosen = set(a.profile)
    known = {s.label for s in cases(a, "train") + cases(a, "infer")}
    for label in sorted(chosen - known):
        emit({"group": "profile", "error": f"no train or infer case is labelled {label!r}"})
    for spec in [s for s in cases(a, "train") + cases(a, "infer") if s.label in chosen]:
        spec.cuda_graphs = False  # NOTE: the profiler sees the kernels of eager runs; a replay runs the same ones
        if time.time() - T0 > a.budget_s:
            break
        with case_settings(spec.label):  # the case's module settings (CASE_SETTINGS), as group_model runs it
            model, x, y = build(spec, dev)
            train = spec.mode == "train"
            fn = make_train_fn(spec, model, x, y, dev)[0] if train else make_infer_fn(spec, model, x, dev)
            for _ in range(3):
                fn()
            sync()
            with profile(activities=acts) as prof:
                for _ in range(3):
                    fn()
                sync()
        out.append(f"== {spec.label} (3 iterations)\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
        del model, x, y, fn
        release()
    (OUT / "profile.txt").write_text("\n\n".join(out))
    for table in out:  # the top rows matter: print each table's head (the whole file comes back in $OUT)
        print("\n".join(line[:160] for line in table.splitlines()[:24]), flush=True)


# ------------------------------------------------------------------------------------------------- e2e
E2E_WORK = Path(os.environ.get("E2E_WORK", "/tmp/danet-e2e-work"))
# (label, fused_loss_impl, the isolated train-step case of the same settings, more --set), the most telling first (a
# case starts only while the budget lasts): the fastest measured (H200, 2026-11-26: the Triton loss and batch norm,
# each step's forward, loss and backward replayed as a CUDA graph), the same with PyTorch's batch norm and without the
# side-stream prefetch (data.prefetch=false: the batch copied on the compute stream), then the eager steps (bound by
# the host's launches on the H200): the Triton loss with and without the fused batch norm, the compiled loss, the
# whole network compiled (compile=true), the chunked loss, no prefetch
E2E_CASES = [("e2e_bf16_cl_tritonloss_tritonbn_graphs", "triton", "train_bf16_cl_tritonloss_tritonbn_graphs",
              ["norm=triton", "cuda_graphs=true"]),
             ("e2e_bf16_cl_tritonloss_graphs", "triton", "train_bf16_cl_tritonloss_graphs", ["cuda_graphs=true"]),
             ("e2e_bf16_cl_tritonloss_tritonbn_graphs_noprefetch", "triton", "train_bf16_cl_tritonloss_tritonbn_graphs",
              ["norm=triton", "cuda_graphs=true", "data.prefetch=false"]),
             ("e2e_bf16_cl_tritonloss", "triton", "train_bf16_cl_tritonloss", []),
             ("e2e_bf16_cl_tritonloss_tritonbn", "triton", "train_bf16_cl_tritonloss_tritonbn", ["norm=triton"]),
             ("e2e_bf16_cl_compiledloss", "compiled", "train_bf16_cl_compiledloss", []),
             ("e2e_bf16_cl_tritonloss_compile", "triton", "train_bf16_cl_tritonloss_compile", ["compile=true"]),
             ("e2e_bf16_cl_chunkedloss", "chunked", "train_bf16_cl_fusedloss", []),
             ("e2e_bf16_cl_tritonloss_noprefetch", "triton", "train_bf16_cl_tritonloss",
              ["data.prefetch=false"])]  # fmt: skip


def group_e2e(a) -> None:
    """`danet train danet_r50-d8_ade20k` in this process on an ADE20K-layout folder: data loader, augmentation,
    logging, the fastest settings; stopped by stop_iter inside epoch 1 (no validation, one last.pth)."""
    import shutil

    from e2e_data import loop_figures, make_ade_like  # benchmarks/ (this script's folder is on sys.path)

    import danet.engine.train as T
    from danet.config import RunConfig, apply_overrides
    from danet.engine.logging import read_log

    sm = a.smoke
    iters, warm = (3, 1) if sm else (a.e2e_iters, a.e2e_warmup)
    batch, workers = (2, 1) if sm else (8, a.e2e_workers)
    log_every = 1 if sm else 5
    if warm % log_every or warm >= iters:
        raise ValueError(f"--e2e-warmup {warm} must be a multiple of {log_every} below --e2e-iters {iters}")
    hw = (64, 85) if sm else (512, 683)
    t = time.time()
    root = make_ade_like((iters + 1) * batch, 2 if sm else 8, hw)  # one epoch holds the whole run
    data_s = round(time.time() - t, 1)
    sets = ["schedule.epochs=1", f"schedule.iters_per_epoch={iters + 1}", f"stop_iter={iters}",
            f"schedule.batch_size={batch}", "schedule.eval_interval=1000", "schedule.save_interval=1000",
            f"data.num_workers={workers}", "amp=bf16", "channels_last=true", "fused_loss=true",
            f"log_interval={log_every}", "progress=false", "overwrite=true",
            "backbone_weights=none"]  # fmt: skip  # NOTE: the GPU machine has no internet for the ImageNet ResNet
    if sm:  # the narrow R50-D8 of the smoke cases, 64x64 crops of 64x85 images
        nar = dict(base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16)
        sets += ["device=cpu", "threads=1", "data.crop_size=[32,32]", "data.base_size=[256,64]"]
        sets += [f"model.{k}={v}" for k, v in nar.items()]
    orig = T._batches
    waits: list[float] = []

    def timed_batches(loader):  # NOTE: instrumentation only: how long the loop waits for each batch
        gen = orig(loader)
        while True:
            t = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                return
            waits.append(time.perf_counter() - t)
            yield item

    for label, impl, isolated, more in E2E_CASES:
        if a.only and not any(o in label for o in a.only):
            continue
        if time.time() - T0 > a.budget_s:
            emit({"group": "e2e", "label": label, "skipped": "time budget"})
            continue
        work = E2E_WORK / label
        shutil.rmtree(work, ignore_errors=True)
        case_sets = [*sets, f"fused_loss_impl={impl}", *more]
        rec = {"group": "e2e", "label": label, "isolated": isolated, "impl": impl, "iters": iters, "warmup": warm,
               "batch": batch, "num_workers": workers, "cpus": os.cpu_count(), "images": (iters + 1) * batch,
               "image_hw": list(hw), "data_s": data_s, "sets": case_sets}  # fmt: skip
        t, waits[:] = time.time(), []
        peak_reset()
        T._batches = timed_batches
        try:
            cfg = apply_overrides(RunConfig(preset="danet_r50-d8_ade20k", data_root=str(root), work_dir=str(work)),
                                  case_sets)  # fmt: skip
            summary = T.train(cfg)
            rec.update(loop_figures(read_log(work / "log.jsonl"), waits, warm, batch), peak_gib=peak_gib())
            rec["stopped_at"] = summary["iter"]
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
        finally:
            T._batches = orig
        rec["wall_s"] = round(time.time() - t, 1)
        emit(rec)
        shutil.rmtree(work, ignore_errors=True)  # last.pth: ~0.4 GB at full width
        release()


# ------------------------------------------------------------------------------------------------- eval
def group_eval(a) -> None:
    """Evaluation over an ADE20K-layout val split (JPEGs at 512x683, whole-image bf16 channels_last, R50-D8 at random
    weights): images read one by one in this process (workers 0, as both toolboxes' single-GPU test) vs read ahead
    by `eval_workers` processes (the GPU default), then also with the forward replayed as a CUDA graph (`danet test
    --cuda-graphs`; the images share one size), and that with the batch norms folded (`--norm folded`); images/s of
    each and whether the confusion matrices agree."""
    from e2e_data import make_ade_like  # benchmarks/ (this script's folder is on sys.path)

    from danet.data import build_dataset
    from danet.engine.evaluate import eval_workers, evaluate
    from danet.engine.graphed import with_forward_graphs
    from danet.models.registry import create_model
    from danet.presets import get_preset

    sm = a.smoke
    dev = torch.device("cpu" if sm else "cuda")
    n_val, hw = (6, (64, 85)) if sm else (96, (512, 683))
    root = make_ade_like(8, n_val, hw)
    preset = get_preset("danet_r50-d8_ade20k")
    ds = build_dataset(preset, root, "val")
    nar = dict(base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16) if sm else {}
    model = create_model("danet_r50-d8_ade20k", **nar).to(dev).to(memory_format=torch.channels_last).eval()
    torch.backends.cudnn.benchmark = True
    kw = dict(device=dev, amp="bf16", channels_last=True, progress=False)
    evaluate(model, ds, preset.num_classes, limit=4, workers=0, **kw)  # cuDNN autotuning, lazy initialisation
    auto = eval_workers(dev) if not sm else 2
    rec, mats = {"group": "eval", "images": n_val, "image_hw": list(hw), "workers_auto": auto}, []
    for name, net, w in (("workers0", model, 0), ("workers_auto", model, auto),
                         ("workers_auto_graphs", with_forward_graphs(model, dev), auto)):  # fmt: skip
        sync()
        t = time.perf_counter()
        mats.append(evaluate(net, ds, preset.num_classes, workers=w, **kw).mat)
        sync()
        rec[f"img_s_{name}"] = round(n_val / (time.perf_counter() - t), 2)
    rec["same_confusion_matrix"] = all(torch.equal(mats[0], m) for m in mats[1:])
    # `danet test --norm folded --cuda-graphs`: the batch norms folded into the convolutions (bf16, as the run's
    # autocast): images/s and how far the confusion matrix moves (half its absolute difference over the pixels: at
    # least that share of pixels changed class)
    from danet.models.folded import fold_batch_norm

    folded = copy.deepcopy(model)
    fold_batch_norm(folded, torch.bfloat16)
    # NOTE: cuDNN's autotuning of the fused calls, as the unfolded model's above (measured without it, 2026-11-27:
    # 74 img/s against 149 unfolded, ~0.6 s of autotuning in a 1.3 s run)
    evaluate(folded, ds, preset.num_classes, limit=4, workers=0, **kw)
    sync()
    t = time.perf_counter()
    mat = evaluate(with_forward_graphs(folded, dev), ds, preset.num_classes, workers=auto, **kw).mat
    sync()
    rec["img_s_workers_auto_graphs_folded"] = round(n_val / (time.perf_counter() - t), 2)
    rec["folded_unfused_layers"] = sorted({m.unfused for m in folded.modules() if getattr(m, "unfused", None)})
    rec["folded_confusion_moved"] = float((mat - mats[0]).abs().sum() / 2 / mats[0].sum())
    del folded
    # the graphs on many layouts: sliding windows under multi-scale + flip (a layout per scale), eager vs replayed
    tta = dict(
        kw,
        mode="slide",
        crop=(256, 256) if sm else (512, 512),
        scales=(0.75, 1.0, 1.25),
        flip=True,
        limit=min(8, n_val),
    )
    for name, net in (("eager", model), ("graphs", with_forward_graphs(model, dev))):
        sync()
        t = time.perf_counter()
        mats.append(evaluate(net, ds, preset.num_classes, workers=auto, **tta).mat)
        sync()
        rec[f"img_s_slide_tta_{name}"] = round(tta["limit"] / (time.perf_counter() - t), 2)
    rec["slide_tta_graphs"] = len(getattr(net, "graphs", {}))  # the replayed run's (none where graphs cannot run)
    rec["slide_tta_same_confusion_matrix"] = bool(torch.equal(mats[-2], mats[-1]))
    emit(rec)


# ------------------------------------------------------------------------------------------------- head
def _logits(model, x: torch.Tensor, amp: str, graph: bool) -> torch.Tensor:
    """The model's "out" logits in float32, from an eager forward or from a CUDA graph's replay."""

    def fwd():
        ctx = torch.autocast(x.device.type, torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return model(x)["out"].float()

    if not graph or x.device.type != "cuda":
        return fwd()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd()
    torch.cuda.current_stream().wait_stream(side)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = fwd()
    gr.replay()
    return out.clone()


def group_head(a) -> None:
    """The head's branches on two CUDA streams (`DAHead.branch_streams=True`) against one after the other, on the
    models the infer cases time (random weights, the attention's gamma and the batch norms perturbed so that every
    branch counts): relative difference of the logits and the fraction of pixels whose class changes, eager and
    replayed as a CUDA graph (the same kernels: 0 expected); the defaults before 2026-11-27 (CASE_SETTINGS
    `_olddefaults`, eager); then the same model with its batch norms folded into the convolutions (`--norm folded`):
    rounding differences expected in those two."""
    from danet.benchmark import build, resolve_device
    from danet.engine.inference import AMP_DTYPES
    from danet.models.folded import fold_batch_norm

    sm = a.smoke
    dev = resolve_device("cpu" if sm else "auto")
    for case in [c for c in cases(a, "infer") if c.label in ("infer512_bf16_cl_graphs_tritonbn_tritonpam",
                                                            "whole_bf16_cl_graphs_tritonbn_tritonpam")]:  # fmt: skip
        for amp in ("bf16", "none"):
            if time.time() - T0 > a.budget_s:
                return
            case.amp, case.attention = amp, "triton" if amp == "bf16" else "fused"
            model, x, _ = build(case, dev)
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    if hasattr(m, "gamma"):
                        m.gamma.fill_(0.5)
            model.eval()
            rec = {"group": "head", "case": case.label, "amp": amp}
            refs = {}
            for gph in (False, True):
                name = "graph" if gph else "eager"
                model.head.branch_streams = False
                r = refs[gph] = _logits(model, x, amp, gph)
                model.head.branch_streams = True
                o = _logits(model, x, amp, gph)
                rec[f"streams_{name}_rel"] = float((o - r).norm() / r.norm())
                rec[f"streams_{name}_changed"] = float((o.argmax(1) != r.argmax(1)).float().mean())
            if case.attention == "triton":  # the defaults before 2026-11-27 (the attention kernel without exp2 and
                # its fused residual, the channel attention's addcmul; PyTorch's pooling and resize): rounding
                with case_settings("_olddefaults"):
                    o = _logits(model, x, amp, False)
                rec["olddefaults_eager_rel"] = float((o - refs[False]).norm() / refs[False].norm())
                rec["olddefaults_eager_changed"] = float((o.argmax(1) != refs[False].argmax(1)).float().mean())
            # the batch norms folded into the convolutions (`--norm folded`): rounding, not bits
            fold_batch_norm(model, AMP_DTYPES.get(amp, torch.float32))
            for gph in (False, True):
                name = "graph" if gph else "eager"
                try:
                    o, r = _logits(model, x, amp, gph), refs[gph]
                    rec[f"folded_{name}_rel"] = float((o - r).norm() / r.norm())
                    rec[f"folded_{name}_changed"] = float((o.argmax(1) != r.argmax(1)).float().mean())
                except Exception as e:  # noqa: BLE001  (cuDNN's fused ops refused: record it, the rest goes on)
                    first = str(e).splitlines()[0][:160] if str(e) else ""
                    rec[f"folded_{name}_error"] = f"{type(e).__name__}: {first}"
            emit(rec)
            del model, x
            release()


# ------------------------------------------------------------------------------------------------- resize
def group_resize(a) -> None:
    """The final bilinear resize of the logits, channels_last: PyTorch's NHWC kernel (the path before 2026-11-27)
    against `upsample_logits` (the NCHW kernel after a copy of the small logits): median ms of each and whether the
    values are the same bits, for ADE20K's 150 classes 64x64 -> 512x512 and Cityscapes' 19 classes 128x256 ->
    1024x2048, bf16 and float32; and the Triton kernel (`models/triton_resize.py`: ms, same bits as the NCHW kernel,
    relative difference, share of pixels whose class changed)."""
    from danet.models.danet import upsample_logits
    from danet.models.triton_resize import resize_bilinear

    dev = "cpu" if a.smoke else "cuda"
    shapes = [(150, (8, 8), (64, 64))] if a.smoke else [(150, (64, 64), (512, 512)), (19, (128, 256), (1024, 2048))]
    for k, (h, w), size in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, k, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)

            def nhwc(x=x, size=size):
                return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

            def nchw(x=x, size=size):  # NOTE: gradients on here: PyTorch's NCHW kernel, never the Triton one
                return upsample_logits(x, size, False, nchw=True)

            def tri(x=x, size=size):
                return resize_bilinear(x, size, False)

            rec = {"group": "resize", "classes": k, "from": [h, w], "to": list(size), "dtype": str(dtype)[6:]}
            rec["same_bits"] = bool(torch.equal(nhwc(), nchw()))
            ref, ours = nchw(), tri()
            rec["triton_same_bits"] = bool(torch.equal(ref, ours))
            rec["triton_rel"] = float((ours.double() - ref.double()).norm() / ref.double().norm())
            rec["triton_changed"] = float((ours.argmax(1) != ref.argmax(1)).float().mean())
            calls, warmup, iters = (1, 0, 1) if a.smoke else (20, 3, 10)  # (Triton's interpreter: ~1 s a call)
            for name, fn in (("nhwc", nhwc), ("nchw", nchw), ("triton", tri)):  # 20 calls a synchronisation: the
                # kernels, not the sync
                ms = 1e3 * bench(lambda fn=fn, n=calls: [fn() for _ in range(n)], warmup, iters) / calls
                rec[f"ms_{name}"] = round(ms, 4)
            emit(rec)


# ------------------------------------------------------------------------------------------------- convs
def group_convs(a) -> None:
    """Every distinct convolution of the folded network (`--norm folded`) on a whole 1024x2048 Cityscapes image, bf16,
    channels last (smoke: the narrow model at 64x128 on the CPU), with its batch norm's work, run each way (median ms
    of 5 calls a synchronisation), times the number of such layers; to choose per layer if cuDNN's fused calls are
    slower than the rest somewhere:
    - conv: the convolution alone (F.conv2d, no bias), as the unfolded network runs it;
    - conv_bn: that + the fused Triton batch norm pass (+ residual, ReLU): `norm=triton`, the fastest measured so far;
    - conv_bias_act: the folded convolution (F.conv2d with its bias), then add_ / relu_ (folded, not fused);
    - cudnn_fused: torch.cudnn_convolution_relu / add_relu, what `--norm folded` runs on CUDA;
    - gemm_epilogue (1x1, stride 1, ReLU without residual): torch._addmm_activation, cuBLASLt's bias + ReLU epilogue,
      on the (N*H*W, C) view of the channels-last map (the same products);
    - padded8 (the image's 3 channels): the input and weights padded with zero channels to 8, the copy included, then
      cuDNN's fused call (PyTorch's profile shows a generic non-tensor-core engine for 3 channels: 81 us a forward).
    Then one record with each way's total over the network and the total of the per-layer fastest."""
    from danet.benchmark import build, resolve_device
    from danet.models.folded import FoldedConv2d

    sm = a.smoke
    dev = resolve_device("cpu" if sm else "auto")
    spec = next(c for c in cases(a, "infer") if c.label == "whole_bf16_cl_graphs_folded_tritonpam")
    model, x, _ = build(dataclasses.replace(spec, attention="fused"), dev)
    seen: dict[tuple, int] = {}

    def record(conv, args, kwargs):
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        key = (tuple(args[0].shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.act,
               residual is not None)  # fmt: skip
        seen[key] = seen.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
             if isinstance(m, FoldedConv2d)]  # fmt: skip
    pooled: list = []
    hooks.append(model.backbone.maxpool.register_forward_pre_hook(lambda m, args: pooled.append(args[0].shape)))
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16):
        model(x)
    for h in hooks:
        h.remove()
    del model, x
    release()
    bench_before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True  # as the infer cases
    try:
        _time_convs(a, dev, seen)
    finally:
        torch.backends.cudnn.benchmark = bench_before
    release()
    # the stem's max pooling: PyTorch's (which writes int64 indices too) vs the Triton kernel (models/triton_pool.py)
    import danet.models.triton_pool as TP

    pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(pooled[0]).to(dev, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    rec = {"group": "convs", "pool_input": list(pooled[0])}
    with torch.inference_mode():
        rec["pool_same_bits"] = bool(torch.equal(TP.max_pool(pool, x), pool(x)))
        for name, fn in (("torch", lambda: pool(x)), ("triton", lambda: TP.max_pool(pool, x))):
            rec[f"pool_ms_{name}"] = round(1e3 * bench(lambda fn=fn: [fn() for _ in range(5)], 2, 5) / 5, 4)
    emit(rec)


def _time_convs(a, dev: torch.device, seen: dict) -> None:
    g = torch.Generator().manual_seed(0)
    totals: dict[str, float] = {}
    best_total = 0.0
    for (shape, wshape, stride, padding, dilation, act, has_res), count in seen.items():
        if time.time() - T0 > a.budget_s:
            emit({"group": "convs", "skipped": "time budget"})
            return
        ways = _conv_ways(dev, g, shape, wshape, stride, padding, dilation, act, has_res)
        rec = {"group": "convs", "input": list(shape), "weight": list(wshape), "stride": stride[0],
               "dilation": dilation[0], "act": act, "residual": has_res, "count": count}  # fmt: skip
        with torch.inference_mode():
            for name, fn in ways.items():
                try:
                    if name in ("cudnn_fused", "gemm_epilogue", "padded8"):  # the folded convolution's values
                        ref = ways["conv_bias_act"]().float()
                        rec[f"rel_{name}"] = float((fn().float() - ref).norm() / ref.norm())
                    rec[f"ms_{name}"] = round(1e3 * bench(lambda fn=fn: [fn() for _ in range(5)], 2, 5) / 5, 4)
                    totals[name] = totals.get(name, 0.0) + count * rec[f"ms_{name}"]
                except Exception as e:  # noqa: BLE001  (a cuDNN fused call refused: data on a GPU)
                    rec[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        # the shortcut's bias joins its block's last convolution: folded, it is the plain convolution
        ways_folded = ("conv_bias_act", "cudnn_fused", "gemm_epilogue", "padded8")
        folded = [n for n in ways_folded if f"ms_{n}" in rec] if act else ["conv"]
        if folded:
            rec["fastest_folded"] = min(folded, key=lambda n: rec[f"ms_{n}"])
            best_total += count * rec[f"ms_{rec['fastest_folded']}"]
        emit(rec)
        del ways
    # NOTE: gemm_epilogue's total covers only the layers it can run (1x1, stride 1, no residual)
    emit({"group": "convs", "total_ms": {k: round(v, 3) for k, v in totals.items()},
          "total_ms_fastest_folded_per_layer": round(best_total, 3), "layers": sum(seen.values())})  # fmt: skip


def _conv_ways(dev, g, shape, wshape, stride, padding, dilation, act: bool, has_res: bool) -> dict:
    """The ways of running one convolution with its batch norm's work (group_convs), on random bf16 channels-last
    tensors of its shapes."""
    from danet.models.fused_norm import FusedBatchNorm2d

    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(shape, generator=g).to(dev, torch.bfloat16).contiguous(**cl)
    w = (torch.randn(wshape, generator=g) / math.sqrt(wshape[1] * wshape[2] * wshape[3])).to(dev, torch.bfloat16)
    w = w.contiguous(**cl)
    b = torch.randn(wshape[0], generator=g).to(dev, torch.bfloat16)
    out_shape = F.conv2d(x, w, None, stride, padding, dilation).shape
    res = torch.randn(out_shape, generator=g).to(dev, torch.bfloat16).contiguous(**cl) if has_res else None
    bn = FusedBatchNorm2d(wshape[0]).to(dev).eval()
    args = (list(stride), list(padding), list(dilation), 1)

    def conv():
        return F.conv2d(x, w, None, stride, padding, dilation)

    def conv_bn():
        y = conv()
        return bn.forward_act(y, res) if act else bn(y)

    def conv_bias_act():
        y = F.conv2d(x, w, b, stride, padding, dilation)
        if res is not None:
            y.add_(res)
        return torch.relu_(y) if act else y

    ways = {"conv": conv, "conv_bn": conv_bn, "conv_bias_act": conv_bias_act}
    if act and dev.type == "cuda":
        if has_res:
            ways["cudnn_fused"] = lambda: torch.cudnn_convolution_add_relu(x, w, res, 1.0, b, *args)
        else:
            ways["cudnn_fused"] = lambda: torch.cudnn_convolution_relu(x, w, b, *args)
    if act and not has_res and wshape[1] == 3:  # the image's 3 channels padded with zeros to 8 (weights too): the
        wp = torch.zeros(wshape[0], 8, *wshape[2:], device=dev, dtype=w.dtype)  # same sums, a tensor-core layout
        wp[:, :3] = w
        wp = wp.contiguous(**cl)

        def padded8():
            xp = x.new_zeros(shape[0], shape[2], shape[3], 8)
            xp[..., :3] = x.permute(0, 2, 3, 1)
            xp = xp.permute(0, 3, 1, 2)
            if dev.type == "cuda":
                return torch.cudnn_convolution_relu(xp, wp, b, *args)
            return torch.relu_(F.conv2d(xp, wp, b, stride, padding, dilation))

        ways["padded8"] = padded8
    if act and not has_res and tuple(wshape[2:]) == (1, 1) and tuple(stride) == (1, 1):
        x2d, w2d = x.permute(0, 2, 3, 1).reshape(-1, wshape[1]), w.reshape(wshape[0], wshape[1])
        n, _, h, w_ = out_shape
        ways["gemm_epilogue"] = lambda: torch._addmm_activation(b, x2d, w2d.t()).view(n, h, w_, -1).permute(0, 3, 1, 2)
    return ways


# ------------------------------------------------------------------------------------------------- fidelity
def group_fidelity(a) -> None:
    """Issue 5's check on the GPU itself: 20 SGD steps from the same weights over the same 4 batches (random labels,
    10 % ignored; dropout off, so that both runs see the same network): float32 (cuDNN's TF32 off) with the
    reference loss vs the fastest settings (bf16, channels_last, Triton loss, fused batch norm, the step replayed as a
    CUDA graph). Per-step relative deviation of the loss, against the CPU test's bound for bf16 (max 2 %, mean 0.6 %:
    tests/test_speed_options.py::test_bf16_training_tracks_float32)."""
    from danet.benchmark import build, make_train_fn, resolve_device

    sm = a.smoke
    dev = resolve_device("cpu" if sm else "auto")
    nar = dict(base_channels=4, stem_channels=8, head_channels=32, key_channels=16, aux_channels=16) if sm else {}
    base = dict(preset="danet_r50-d8_ade20k", mode="train", batch=2 if sm else 8, size=(32, 32) if sm else (512, 512),
                overrides=nar, cudnn_benchmark=True)  # fmt: skip
    runs = {"fp32_reference": BenchSpec(**base),
            "fast": BenchSpec(**base, amp="bf16", channels_last=True, loss="triton", norm="triton",
                              cuda_graphs=not sm)}  # fmt: skip
    b, (h, w) = base["batch"], base["size"]
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        x = torch.randn(b, 3, h, w, generator=g)
        y = torch.randint(0, 150, (b, h, w), generator=g)
        y[torch.rand(b, h, w, generator=g) < 0.1] = 255
        data.append((x.to(dev), y.to(dev)))
    steps = 4 if sm else 20  # the smoke: Triton's interpreter runs the fast case's kernels (~10 s a step)
    rec: dict = {"group": "fidelity", "steps": steps}
    tf32 = torch.backends.cudnn.allow_tf32
    for name, spec in runs.items():
        torch.backends.cudnn.allow_tf32 = name != "fp32_reference"
        torch.backends.cudnn.benchmark = True
        model, x, y = build(spec, dev)  # the same seed: the same weights
        for m in model.modules():
            if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
                m.p = 0.0
        fn, last = make_train_fn(spec, model, x, y, dev)
        losses = []
        for i in range(steps):
            x.copy_(data[i % 4][0])
            y.copy_(data[i % 4][1])
            fn()
            losses.append(float(last["loss"]))
        rec[name] = [round(v, 6) for v in losses]
        del model, x, y, fn, last
        release()
    torch.backends.cudnn.allow_tf32 = tf32
    devs = [abs(f - r) / abs(r) for f, r in zip(rec["fast"], rec["fp32_reference"], strict=True)]
    rec.update(max_rel_dev=round(max(devs), 5), mean_rel_dev=round(sum(devs) / len(devs), 5))
    rec["within_bf16_bound"] = rec["max_rel_dev"] < 0.02 and rec["mean_rel_dev"] < 0.006
    emit(rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = ["sys", "loss", "norm", "train", "fidelity", "e2e", "profile", "eval", "infer", "compile"]
    p.add_argument("groups", nargs="*", default=groups, help=f"of: {' '.join(groups)} pam head resize convs")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that every case runs")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 1e9)),
                   help="skip the cases that would start after this many seconds")  # fmt: skip
    p.add_argument("--only", nargs="*", help="only the cases whose label contains one of these")
    p.add_argument("--profile", nargs="*", metavar="LABEL", help="the profile group's cases (train or infer labels; "
                   "graph-replayed cases run eagerly there)",
                   default=["train_bf16_cl_tritonloss", "train_bf16_cl_tritonloss_tritonbn"])  # fmt: skip
    env_int = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    p.add_argument("--e2e-iters", type=int, default=env_int("E2E_ITERS", 50), help="e2e: iterations a run (--smoke: 3)")
    p.add_argument("--e2e-warmup", type=int, default=env_int("E2E_WARMUP", 10),
                   help="e2e: first iterations left out of images/s (a multiple of 5)")  # fmt: skip
    p.add_argument("--e2e-workers", type=int, default=env_int("E2E_WORKERS", 8), help="e2e: data.num_workers")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    env = {"group": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": a.smoke,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}  # fmt: skip
    emit(env)
    for g in a.groups:
        if time.time() - T0 > a.budget_s:
            emit({"group": g, "skipped": "time budget"})
            continue
        t = time.time()
        try:
            special = {"sys": group_sys, "pam": group_pam, "loss": group_loss, "norm": group_norm,
                       "profile": group_profile, "e2e": group_e2e, "eval": group_eval,
                       "fidelity": group_fidelity, "head": group_head,
                       "resize": group_resize, "convs": group_convs}  # fmt: skip
            special.get(g, lambda a, g=g: group_model(a, g))(a)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit({"group": g, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"# group {g}: {time.time() - t:.0f} s (total {time.time() - T0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
