"""The Triton kernels of the fused batch norm + residual add + ReLU (models/fused_norm.py has the autograd function
that launches them, its design and the measurements).

An (M = N*H*W rows, C channels) view of an NCHW- or NHWC-contiguous tensor (`CL`: channels last), in tiles of
BLOCK_M x BLOCK_C; accumulation in float32 (float64 for float64 tensors):
- bn_partial_stats: per tile of rows, a centred partial (count, mean, M2) per channel;
- bn_combine_stats: the partials merged (Chan's formula), mean and 1/std, running statistics updated;
- bn_apply: y = relu(x * scale + shift [+ residual]);
- bn_backward_reduce: per tile of rows, the sums of the upstream gradient and of it times x-hat;
- bn_backward_apply: dx (and the residual's gradient) from those sums.
Defined only where Triton is installed (`triton` is None otherwise: CPU builds of PyTorch come without it).
"""

from __future__ import annotations

import os

try:  # NOTE: module level (see engine/triton_loss.py)
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without it
    triton = None


def interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton's interpreter runs the kernels on the CPU (the tests' way to check them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def inference_kernel_runs(x, interpreter: bool) -> bool:
    """Whether an inference-only Triton kernel may take `x` at all: Triton installed, no gradients, not under
    torch.compile, on CUDA, or on the CPU through Triton's interpreter where `interpreter` (the module's INTERPRETER,
    which the tests set) allows it."""
    import torch

    if triton is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return x.is_cuda or (interpreter and interpreted())


if triton is not None:

    @triton.jit
    def _offsets(rows, cols, C, HW, CL: tl.constexpr):
        if CL:  # NHWC: row m, channel c at m * C + c
            return rows[:, None] * C + cols[None, :]
        else:  # NCHW: image m // HW, pixel m % HW
            return ((rows // HW) * C * HW + rows % HW)[:, None] + cols[None, :] * HW

    @triton.jit
    def _tile(M, C, HW, CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of BLOCK_M rows x BLOCK_C channels: channels, their mask, the element mask, offsets."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        return cols, cmask, (rows < M)[:, None] & cmask[None, :], _offsets(rows, cols, C, HW, CL)

    @triton.jit
    def _scale_shift(invstd, w_ptr, b_ptr, cols, cmask):
        """Per channel w / std and b, in the statistics' dtype: y = (x - mean) * scale + shift."""
        scale = invstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(invstd.dtype)
        return scale, tl.load(b_ptr + cols, mask=cmask, other=0.0).to(invstd.dtype)

    @triton.jit
    def _invstd(var, eps):
        """1 / sqrt(var + eps), correctly rounded (plain `sqrt` and `/` are approximate in float32 on GPUs)."""
        if var.dtype == tl.float64:
            return 1.0 / tl.sqrt(var + eps)
        else:
            return tl.div_rn(1.0, tl.sqrt_rn(var + eps))

    @triton.jit
    def _chan(n, mean, m2, nb, mb, qb):
        """Chan et al.'s merge of (count, mean, M2) with a block's (nb, mb, qb): the merged (count, mean, M2)."""
        n_new = n + nb
        delta = mb - mean
        frac = nb / tl.maximum(n_new, 1.0)
        return n_new, mean + delta * frac, m2 + qb + delta * delta * n * frac

    @triton.jit
    def bn_partial_stats(
        x_ptr, mean_ptr, m2_ptr, M, C, HW, iters, CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """Program (p, c-block): rows [p * iters * BLOCK_M, ...) -> mean and M2 (sum of squared deviations)."""
        p = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = mean_ptr.dtype.element_ty
        n = tl.zeros([BLOCK_C], dtype=acc)
        mean = tl.zeros([BLOCK_C], dtype=acc)
        m2 = tl.zeros([BLOCK_C], dtype=acc)
        for i in range(iters):
            rows = (p * iters + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + _offsets(rows, cols, C, HW, CL), mask=mask, other=0.0).to(acc)
            nb = tl.sum(mask.to(acc), 0)
            mb = tl.sum(x, 0) / tl.maximum(nb, 1.0)
            d = tl.where(mask, x - mb[None, :], 0.0)
            n, mean, m2 = _chan(n, mean, m2, nb, mb, tl.sum(d * d, 0))
        tl.store(mean_ptr + p * C + cols, mean, mask=cmask)
        tl.store(m2_ptr + p * C + cols, m2, mask=cmask)

    @triton.jit
    def bn_combine_stats(
        mean_p,
        m2_p,
        scalars_ptr,  # [eps, momentum factor] in the accumulation dtype
        mean_ptr,
        invstd_ptr,
        rmean_ptr,
        rvar_ptr,
        P,
        M,
        C,
        rows_per_program,
        LOCAL: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Chan's combination of the P partials of a block of channels; batch mean, 1/std; running statistics.
        LOCAL (synchronised batch norm): this process's mean and M2 (into invstd_ptr) only, for the processes' merge."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = mean_p.dtype.element_ty
        n = tl.zeros([BLOCK_C], dtype=acc)
        mean = tl.zeros([BLOCK_C], dtype=acc)
        m2 = tl.zeros([BLOCK_C], dtype=acc)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            mask = (ps < P)[:, None] & cmask[None, :]
            cnt = tl.minimum(tl.maximum(M - ps * rows_per_program, 0), rows_per_program).to(acc)
            cnt2 = tl.where(mask, cnt[:, None], 0.0)
            mp = tl.load(mean_p + ps[:, None] * C + cols[None, :], mask=mask, other=0.0)
            qp = tl.load(m2_p + ps[:, None] * C + cols[None, :], mask=mask, other=0.0)
            nb = tl.sum(cnt2, 0)
            mb = tl.sum(cnt2 * mp, 0) / tl.maximum(nb, 1.0)
            d = mp - mb[None, :]
            qb = tl.sum(tl.where(mask, qp + cnt2 * d * d, 0.0), 0)
            n, mean, m2 = _chan(n, mean, m2, nb, mb, qb)
        tl.store(mean_ptr + cols, mean, mask=cmask)
        if LOCAL:
            tl.store(invstd_ptr + cols, m2, mask=cmask)
        else:
            eps = tl.load(scalars_ptr)
            factor = tl.load(scalars_ptr + 1)
            tl.store(invstd_ptr + cols, _invstd(m2 / M, eps), mask=cmask)
            rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0)
            rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0)
            unbiased = m2 / tl.maximum(M - 1, 1)
            tl.store(rmean_ptr + cols, (factor * mean + (1.0 - factor) * rm).to(rm.dtype), mask=cmask)
            tl.store(rvar_ptr + cols, (factor * unbiased + (1.0 - factor) * rv).to(rv.dtype), mask=cmask)

    @triton.jit
    def bn_apply(
        x_ptr,
        r_ptr,
        y_ptr,
        mean_ptr,
        stat_ptr,  # 1/std (training) or the running variance (FROM_VAR)
        w_ptr,
        b_ptr,
        scalars_ptr,
        M,
        C,
        HW,
        CL: tl.constexpr,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        FROM_VAR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """y = relu((x - mean) * (w / std) + b [+ r]), computed in the statistics' dtype, stored in y's."""
        cols, cmask, mask, offs = _tile(M, C, HW, CL, BLOCK_M, BLOCK_C)
        acc = scalars_ptr.dtype.element_ty
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(acc)
        stat = tl.load(stat_ptr + cols, mask=cmask, other=1.0).to(acc)
        if FROM_VAR:
            stat = _invstd(stat, tl.load(scalars_ptr))
        scale, shift = _scale_shift(stat, w_ptr, b_ptr, cols, cmask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        if HAS_RES:
            y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _upstream(dy_ptr, x, y_ptr, offs, mask, mean, scale, shift, RELU: tl.constexpr, MASK_FROM_Y: tl.constexpr):
        """The gradient reaching batch norm's output: dy where the ReLU passed (its input > 0), else 0."""
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(mean.dtype)
        if RELU:
            if MASK_FROM_Y:  # after a residual add: the stored output says where it passed
                keep = tl.load(y_ptr + offs, mask=mask, other=0.0) > 0
            else:  # the forward's own arithmetic, redone from x
                keep = ((x - mean[None, :]) * scale[None, :] + shift[None, :]) > 0
            dz = tl.where(keep, dz, 0.0)
        return dz

    @triton.jit
    def bn_backward_reduce(
        dy_ptr,
        x_ptr,
        y_ptr,
        dz_ptr,  # written when WRITE_DZ: the gradient after the ReLU (that of the residual)
        mean_ptr,
        invstd_ptr,
        w_ptr,
        b_ptr,
        sums_ptr,  # (2, P, C): partial sums of dz and of dz * xhat
        M,
        C,
        HW,
        P,
        iters,
        CL: tl.constexpr,
        RELU: tl.constexpr,
        MASK_FROM_Y: tl.constexpr,
        WRITE_DZ: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        p = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
        acc = mean.dtype
        scale, shift = _scale_shift(invstd, w_ptr, b_ptr, cols, cmask)
        s1 = tl.zeros([BLOCK_C], dtype=acc)
        s2 = tl.zeros([BLOCK_C], dtype=acc)
        for i in range(iters):
            rows = (p * iters + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & cmask[None, :]
            offs = _offsets(rows, cols, C, HW, CL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            dz = _upstream(dy_ptr, x, y_ptr, offs, mask, mean, scale, shift, RELU, MASK_FROM_Y)
            if WRITE_DZ:  # NOTE: the sums then take the stored (rounded) values, those the second pass reads
                dz = dz.to(dz_ptr.dtype.element_ty)
                tl.store(dz_ptr + offs, dz, mask=mask)
                dz = dz.to(acc)
            s1 += tl.sum(dz, 0)
            s2 += tl.sum(dz * ((x - mean[None, :]) * invstd[None, :]), 0)
        tl.store(sums_ptr + p * C + cols, s1, mask=cmask)
        tl.store(sums_ptr + (P + p) * C + cols, s2, mask=cmask)

    @triton.jit
    def bn_backward_apply(
        dy_ptr,
        x_ptr,
        y_ptr,
        dx_ptr,
        mean_ptr,
        invstd_ptr,
        w_ptr,
        b_ptr,
        sums_ptr,  # (2, C): sum of dz, sum of dz * xhat, over `count` values per channel
        count,
        M,
        C,
        HW,
        CL: tl.constexpr,
        RELU: tl.constexpr,
        MASK_FROM_Y: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dx = (w / std) * (dz - mean(dz) - xhat * mean(dz * xhat))."""
        cols, cmask, mask, offs = _tile(M, C, HW, CL, BLOCK_M, BLOCK_C)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
        acc = mean.dtype
        scale, shift = _scale_shift(invstd, w_ptr, b_ptr, cols, cmask)
        k1 = tl.load(sums_ptr + cols, mask=cmask, other=0.0) / count
        k2 = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0) / count
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        dz = _upstream(dy_ptr, x, y_ptr, offs, mask, mean, scale, shift, RELU, MASK_FROM_Y)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dz - k1[None, :] - xhat * k2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
