"""The position attention's softmax(q k^T) v as one Triton kernel for inference (`attention="triton"`).

Why: PyTorch's fused attention needs a value as narrow as the query (64 in DANet), so the default path
(`attention.attend`) splits the 512-wide value into 8 heads that share q and k, and every head recomputes q k^T and
its exponentials: over a whole 1024x2048 Cityscapes image (N = 32,768 positions) that is 8 x 137 = 1,100 GFLOP of
q k^T and 8.6 G exponentials where the attention needs 137 GFLOP and 1.07 G, next to the 1,100 GFLOP of the product
with v. On an H200 that forward took 4.6-4.9 ms (bf16; cuDNN / the default backend), ~40 % of the 11.96 ms image;
the materialised softmax(q k^T) v took 3.9 ms but holds an N x N matrix (2 GiB).

Here each program keeps a block of BLOCK_M queries and BLOCK_C of the value's channels: it runs over the keys in
blocks of BLOCK_N with the online softmax (running row maximum and sum, as flash attention), so q k^T is computed
C / BLOCK_C times (2 with the default 256 of 512: 274 GFLOP) and nothing N x N is stored. Forward only: training
keeps PyTorch's fused attention, which has a backward. Accumulation in float32 (float64 for float64 inputs, which
only Triton's CPU interpreter runs, for exactness tests); the probabilities are cast to the value's dtype for the
product with it, as flash attention does.

Predicted for the H200: the attention of a whole Cityscapes image 4.6 -> ~2.5-3 ms, the image 11.96 -> ~10 ms.
Measured there (bf16, channels_last, CUDA graph, fused batch norm; benchmarks/RESULTS.md, 4th H200 session): the
attention 4.55 -> 2.92 ms (~470 TFLOP/s of the 1,374 GFLOP it computes), the image 11.96 -> 10.28 ms; with EXP2 and
the module's residual in the kernel (RESIDUAL), 2.51 ms (~550 TFLOP/s; 5th session).
"""

from __future__ import annotations

import torch

from ..errors import note
from .norm_kernels import interpreted, triton

if triton is not None:
    import triton.language as tl

    LOG2E = tl.constexpr(1.4426950408889634)
    RESCALE_AT = tl.constexpr(5.5)  # LAZY: the exponentials stay <= e^5.5 ~ 245 (fp16's largest value is 65,504)

    @triton.jit
    def _exp(x, EXP2: tl.constexpr):
        return tl.math.exp2(x * LOG2E) if EXP2 else tl.exp(x)

    @triton.jit
    def _exp_minus(s, row_max, EXP2: tl.constexpr):
        """exp(s - row_max[:, None]); EXP2: exp2 of one fused multiply-add."""
        if EXP2:
            return tl.math.exp2(tl.fma(s, LOG2E, -(row_max * LOG2E)[:, None]))
        return tl.exp(s - row_max[:, None])

    @triton.jit
    def pam_forward(q_ptr, k_ptr, v_ptr, o_ptr, x_ptr, g_ptr, N, D, C, s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob,
                    s_on, s_xb, s_xn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr, F64: tl.constexpr, UPCAST: tl.constexpr, EXP2: tl.constexpr = False,
                    LAZY: tl.constexpr = False, RESIDUAL: tl.constexpr = False):  # fmt: skip
        """o[b, m, c] = sum_n softmax_n(q[b, m] . k[b, n]) v[b, n, c] for one block of queries x channels (each
        tensor's last dimension contiguous: 128-bit loads); RESIDUAL: o = g * that + x[b, m, c] (the module's
        output, g a 0-dim tensor), in the accumulator's dtype, rounded once.
        UPCAST: the products' operands in float32 (Triton's interpreter multiplies bf16 matrices wrongly; float32
        products of bf16 values, accumulated in float32, are what the GPU's bf16 MMA computes).
        EXP2: exp(s - m) as exp2(s * log2(e) - m * log2(e)), one fused multiply-add before the exponential unit's
        exp2 where exp takes a subtraction and a multiplication (as flash attention does).
        LAZY: the accumulator (BLOCK_M x BLOCK_C multiplications a key step) is rescaled only when some row's
        maximum grows by more than RESCALE_AT; meanwhile the exponentials use the older maximum (each at most
        e^RESCALE_AT; the sum and the accumulator use the same one, so the quotient is the same function)."""
        acc_t = tl.float64 if F64 else tl.float32
        b = tl.program_id(2).to(tl.int64)  # NOTE: b * batch stride passes 2^31 from (B - 1) * N * C on
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask, c_mask, d_mask = offs_m < N, offs_c < C, offs_d < D
        q = tl.load(q_ptr + b * s_qb + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), acc_t)
        row_sum = tl.zeros([BLOCK_M], acc_t)
        acc = tl.zeros([BLOCK_M, BLOCK_C], acc_t)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N  # k: (BLOCK_D, BLOCK_N), transposed as it is read
            k = tl.load(k_ptr + b * s_kb + offs_n[None, :] * s_kn + offs_d[:, None],
                        mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, k, out_dtype=acc_t)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            block_max = tl.max(s, 1)
            if LAZY:
                if tl.max(block_max - row_max, 0) > RESCALE_AT:  # always in the first step (row_max -inf)
                    new_max = tl.maximum(row_max, block_max)
                    alpha = _exp(row_max - new_max, EXP2)
                    acc = acc * alpha[:, None]
                    row_sum = row_sum * alpha
                    row_max = new_max
                p = _exp_minus(s, row_max, EXP2)
                row_sum = row_sum + tl.sum(p, 1)
            else:
                new_max = tl.maximum(row_max, block_max)
                alpha = _exp(row_max - new_max, EXP2)
                p = _exp_minus(s, new_max, EXP2)
                row_sum = row_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * s_vb + offs_n[:, None] * s_vn + offs_c[None, :],
                        mask=n_mask[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
            p = p.to(v.dtype)  # NOTE: as flash attention, the probabilities in the value's dtype for the product
            if UPCAST:
                p, v = p.to(tl.float32), v.to(tl.float32)
            if LAZY:
                acc = acc + tl.dot(p, v, out_dtype=acc_t)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v, out_dtype=acc_t)
                row_max = new_max
        out = acc / row_sum[:, None]
        mc_mask = m_mask[:, None] & c_mask[None, :]
        if RESIDUAL:
            x = tl.load(x_ptr + b * s_xb + offs_m[:, None] * s_xn + offs_c[None, :], mask=mc_mask, other=0.0)
            out = out * tl.load(g_ptr).to(acc_t) + x.to(acc_t)
        tl.store(o_ptr + b * s_ob + offs_m[:, None] * s_on + offs_c[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mc_mask)  # fmt: skip


# blocks: BLOCK_M queries x BLOCK_C value channels per program, keys in steps of BLOCK_N (sm_90: no register spills
# with 8 warps, tests/compile_kernels_sm90.py)
BLOCK_M, BLOCK_N, MAX_BLOCK_C, NUM_WARPS = 128, 64, 256, 8
NUM_STAGES = None  # Triton's default software pipelining (the GPU suite's pam group times others)
# the kernel's EXP2 / LAZY, and PositionAttention's gamma * out + x in the kernel (RESIDUAL) rather than an addcmul
# after it: on an H200 (2026-11-27, a whole 1024x2048 image, folded, CUDA graph) EXP2 took 8.56 -> 8.20 ms, RESIDUAL
# 8.56 -> 8.37 (the attention kernel 2.97 -> 2.51 ms with both); LAZY (with EXP2) lost: 8.50 -> 8.68
EXP2_FMA, LAZY_RESCALE, FUSE_RESIDUAL = True, False, True
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def blocks(d: int, c: int) -> dict:
    """The kernel's block sizes for query width d and value width c (powers of two, at least 16 for tl.dot)."""
    return {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "BLOCK_C": min(MAX_BLOCK_C, max(16, triton.next_power_of_2(c))),
    }


def attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T) v (no scaling), forward only: q, k `(B, N, d)`, v `(B, N, C)` of one dtype -> `(B, N, C)`
    (contiguous in C: `.transpose(1, 2)` of it is a channels-last `(B, C, N)`). An input whose last dimension is not
    contiguous is copied first (the projections of a channels-last map are not copied; NCHW ones are, N x (2d + C)).
    With `residual` (`(B, N, C)`, v's dtype) and `gamma` (a 0-dim tensor): gamma * that + residual, in the kernel."""
    if (residual is None) != (gamma is None):
        raise ValueError("attend_triton: give both residual and gamma, or neither")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    fuse = residual is not None
    if fuse:
        if residual.shape != v.shape or residual.dtype != v.dtype or gamma.numel() != 1:
            raise ValueError("attend_triton: the residual must be shaped and typed as v, gamma one value")
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    b, n, d = q.shape
    c = v.shape[-1]
    out = torch.empty((b, n, c), dtype=v.dtype, device=v.device)
    if n == 0 or b == 0 or c == 0:
        return out
    bs = blocks(d, c)
    grid = (triton.cdiv(n, bs["BLOCK_M"]), triton.cdiv(c, bs["BLOCK_C"]), b)
    upcast = v.dtype == torch.bfloat16 and interpreted()
    x = residual if fuse else out  # (unread without RESIDUAL)
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], *x.stride()[:2])
    launch = {"num_warps": NUM_WARPS} | ({"num_stages": NUM_STAGES} if NUM_STAGES else {})
    flags = {"F64": v.dtype == torch.float64, "UPCAST": upcast, "EXP2": EXP2_FMA, "LAZY": LAZY_RESCALE,
             "RESIDUAL": fuse}  # fmt: skip
    g = gamma.reshape(()) if fuse else out
    pam_forward[grid](q, k, v, out, x, g, n, d, c, *strides, **bs, **flags, **launch)
    return out


def why_unused(device: torch.device, amp: str) -> str | None:
    """Why `--attention triton` would leave an inference on PyTorch's fused attention (None: its kernel runs)."""
    if triton is None:
        return "needs the triton package (part of PyTorch's CUDA builds)"
    if device.type != "cuda" and not interpreted():
        return "runs on CUDA only"
    if amp not in ("bf16", "fp16"):
        return "runs in bf16 / fp16 (add --amp bf16)"
    return None


def set_inference_attention(model, attention: str | None, amp: str = "none") -> str:
    """`danet test` / `predict` `--attention`: the position attention's path (`DANet.set_attention`; None: the
    model's own), with a note where "triton" cannot run its kernel (PyTorch's fused attention runs there, the same
    values to rounding). Returns the path that runs: "fused", "explicit" or "triton"."""
    if attention is not None:
        model.set_attention(attention)
    pam = model.head.pam
    why = why_unused(next(model.parameters()).device, amp) if pam.triton else None
    if why and attention == "triton":
        note(f"--attention triton {why}; PyTorch's fused attention runs")
    if not pam.fused:
        return "explicit"
    return "triton" if pam.triton and why is None else "fused"
