"""The stem's max pooling as one Triton kernel for channels-last inference on CUDA (`ENABLED`).

Why: PyTorch's CUDA max pooling always computes the argmax too, so for the stem's (1, 128, 512, 1024) bf16 map of a
whole Cityscapes image it reads 134 MB, writes 34 MB of output and 134 MB of int64 indices: 137 us a forward on an
H200 (benchmarks/RESULTS.md, the 4th session's profile), where reading the input and writing the output alone take
~45 us at the card's copy rate. The kernel writes the maxima only. Max is exact, so the values are the same bits:
each output the largest of its window's inputs (NaN if any of them is NaN, as PyTorch), padding as -inf.

Each program takes BLOCK_P output pixels of one image x BLOCK_C channels (contiguous in channels last: 128-bit
loads), over the window's K x K taps.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm_kernels import inference_kernel_runs, triton

ENABLED = True  # whether ResNet's stem pools through `max_pool` (in inference on CUDA: see `runs`)
INTERPRETER = False  # also on the CPU through Triton's interpreter where TRITON_INTERPRET=1 (the tests set it)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def max_pool_nhwc(x_ptr, y_ptr, H, W, OH, OW, C, s_xb, s_xh, s_xw, s_yb, s_yh, s_yw,
                      K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, F64: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        """y[b, oh, ow, c] = max over the K x K window at (oh * S - P, ow * S - P) of x[b, ih, iw, c]; compared in
        float32 (float64 for float64), which holds every bf16 / fp16 value exactly (Triton's interpreter compares
        bf16 wrongly)."""
        acc_t = tl.float64 if F64 else tl.float32
        b = tl.program_id(2).to(tl.int64)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_mask, c_mask = offs_p < OH * OW, offs_c < C
        oh, ow = offs_p // OW, offs_p % OW
        out = tl.full([BLOCK_P, BLOCK_C], float("-inf"), acc_t)
        for dy in tl.static_range(K):
            for dx in tl.static_range(K):
                ih, iw = oh * S - P + dy, ow * S - P + dx
                inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row = b * s_xb + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
                v = tl.load(x_ptr + row[:, None] + offs_c[None, :], mask=inside[:, None] & c_mask[None, :],
                            other=float("-inf"))  # fmt: skip
                out = tl.maximum(out, v.to(acc_t), propagate_nan=tl.PropagateNan.ALL)
        dest = b * s_yb + oh.to(tl.int64) * s_yh + ow.to(tl.int64) * s_yw
        tl.store(y_ptr + dest[:, None] + offs_c[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & c_mask[None, :])  # fmt: skip


BLOCK_P, BLOCK_C = 32, 64  # sm_90, 4 warps: 56 registers; 64 x 64 spilled 48 bytes with Triton 3.6


def _square(v) -> int | None:
    """An nn.MaxPool2d setting as one int (None where its two sides differ)."""
    if isinstance(v, int):
        return v
    return v[0] if len(set(v)) == 1 else None


def runs(pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    """Whether the kernel can take this pooling of x: Triton, no gradients, CUDA (or its interpreter), a channels-last
    4-D map of a floating dtype, square kernel / stride / padding, no dilation, ceil_mode or indices."""
    if not inference_kernel_runs(x, INTERPRETER):
        return False
    if x.dim() != 4 or x.dtype not in DTYPES or x.stride(1) != 1 or x.numel() == 0:
        return False
    k, s, p, d = (_square(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    return None not in (k, s, p) and d == 1 and not pool.ceil_mode and not pool.return_indices


def max_pool(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """`pool(x)` through the kernel where `runs` says it can, else `pool(x)`: the same values either way."""
    if not runs(pool, x):
        return pool(x)
    k, s, p = (_square(v) for v in (pool.kernel_size, pool.stride, pool.padding))
    n, c, h, w = x.shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if oh < 1 or ow < 1 or p > k // 2:  # NOTE: PyTorch refuses these; let it say so
        return pool(x)
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    grid = (triton.cdiv(oh * ow, BLOCK_P), triton.cdiv(c, BLOCK_C), n)
    xs, ys = x.stride(), y.stride()
    max_pool_nhwc[grid](x, y, h, w, oh, ow, c, xs[0], xs[2], xs[3], ys[0], ys[2], ys[3], K=k, S=s, P=p,
                        F64=x.dtype == torch.float64, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)  # fmt: skip
    return y
