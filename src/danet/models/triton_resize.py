"""The logits' bilinear resize to the image's size as one Triton kernel for CUDA inference (`ENABLED`).

Why: the last step of a whole-image forward writes K x H x W logits (a 1024x2048 Cityscapes image: 19 x 2 M, 80 MB in
bf16; 512x512 ADE20K: 150 x 262 k, 79 MB) from a 1/8-size map that fits in the L2 cache. On an H200 PyTorch's NCHW
kernel (`upsample_logits`) took 0.12 ms for either (benchmarks/RESULTS.md, the resize table), where writing 80 MB
takes ~25 us at the card's copy rate. Here each program takes BLOCK output pixels of one image, works out their two
source rows and columns and the four weights once, and loops over the classes: 128-bit stores along each row.
Measured there (2026-11-27): 19 classes to 1024x2048 in bf16 0.079 ms against 0.117, the same bits; but 150 classes
to 512x512 0.22 ms against 0.11 (also with the classes split over 8 a program, which took the 19 classes' to 0.118),
so it runs for at most MAX_CLASSES classes (Cityscapes' 19, VOC's 21), PyTorch's kernel for ADE20K's 150.

The same expression as PyTorch's (aten/src/ATen/native/cuda/UpSampleBilinear2d.cu): source index
scale * (dst + 0.5) - 0.5 clamped at 0 (align_corners: (in - 1) / (out - 1) * dst), its integer part and fraction,
h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), in float32 (float64 for float64), rounded once to the logits'
dtype; the compilers may contract other multiply-adds, so a value can differ in its last bit.
"""

from __future__ import annotations

import torch

from .norm_kernels import inference_kernel_runs, triton

ENABLED = True  # whether `upsample_logits` resizes through `resize_bilinear` in inference on CUDA
INTERPRETER = False  # also on the CPU through Triton's interpreter where TRITON_INTERPRET=1 (the tests set it)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BLOCK = 1024  # output pixels a program (4 warps: 8 consecutive pixels a thread, 128-bit stores in bf16)
MAX_CLASSES = 32

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _scale(n_in, n_out, F64: tl.constexpr, ALIGN: tl.constexpr):
        """PyTorch's source-index scale (float32: a correctly rounded division, as CUDA's default one)."""
        acc_t = tl.float64 if F64 else tl.float32
        if ALIGN:
            a, b = (n_in - 1).to(acc_t), tl.maximum(n_out - 1, 1).to(acc_t)
        else:
            a, b = n_in.to(acc_t), n_out.to(acc_t)
        if F64:
            q = a / b
        else:
            q = tl.math.div_rn(a, b)
        if ALIGN:
            q = tl.where(n_out > 1, q, 0.0)
        return q

    @triton.jit
    def bilinear_nchw_out(x_ptr, y_ptr, K, H, W, OH, OW, s_xb, s_xk, s_xh, s_xw,
                          ALIGN: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """y[b, k, oh, ow] (NCHW-contiguous) = the bilinear interpolation of x[b, k] (any strides) at (oh, ow), for
        BLOCK pixels and every class of one image."""
        acc_t = tl.float64 if F64 else tl.float32
        scale_h, scale_w = _scale(H, OH, F64, ALIGN), _scale(W, OW, F64, ALIGN)
        b = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < OH * OW
        oh, ow = offs // OW, offs % OW
        if ALIGN:
            hr = scale_h.to(acc_t) * oh.to(acc_t)
            wr = scale_w.to(acc_t) * ow.to(acc_t)
        else:
            hr = tl.maximum(scale_h.to(acc_t) * (oh.to(acc_t) + 0.5) - 0.5, 0.0)
            wr = tl.maximum(scale_w.to(acc_t) * (ow.to(acc_t) + 0.5) - 0.5, 0.0)
        h0, w0 = hr.to(tl.int32), wr.to(tl.int32)  # truncation (hr, wr >= 0)
        h1l, w1l = hr - h0.to(acc_t), wr - w0.to(acc_t)
        h0l, w0l = 1.0 - h1l, 1.0 - w1l
        h1 = h0 + (h0 < H - 1).to(tl.int32)
        w1 = w0 + (w0 < W - 1).to(tl.int32)
        top, bottom = h0.to(tl.int64) * s_xh, h1.to(tl.int64) * s_xh
        left, right = w0.to(tl.int64) * s_xw, w1.to(tl.int64) * s_xw
        src = x_ptr + b * s_xb
        dst = y_ptr + b * K * OH * OW + offs
        for k in range(0, K):
            base = src + k * s_xk
            a = tl.load(base + top + left, mask=mask, other=0.0).to(acc_t)
            bb = tl.load(base + top + right, mask=mask, other=0.0).to(acc_t)
            c = tl.load(base + bottom + left, mask=mask, other=0.0).to(acc_t)
            d = tl.load(base + bottom + right, mask=mask, other=0.0).to(acc_t)
            val = h0l * (w0l * a + w1l * bb) + h1l * (w0l * c + w1l * d)
            tl.store(dst + k * OH * OW, val.to(y_ptr.dtype.element_ty), mask=mask)


def runs(x: torch.Tensor) -> bool:
    """Whether the kernel takes this resize: Triton, no gradients, CUDA (or its interpreter), a 4-D floating map of
    at most MAX_CLASSES classes."""
    if not inference_kernel_runs(x, INTERPRETER):
        return False
    return x.dim() == 4 and x.dtype in DTYPES and x.numel() > 0 and x.shape[1] <= MAX_CLASSES


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=align_corners)` of `(B, K, h, w)` (any layout) into
    an NCHW-contiguous `(B, K, H, W)`, through the kernel (see `runs`)."""
    n, k, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    y = torch.empty((n, k, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    grid = (triton.cdiv(oh * ow, BLOCK), n)
    bilinear_nchw_out[grid](x, y, k, h, w, oh, ow, *x.stride(), ALIGN=align_corners, F64=x.dtype == torch.float64,
                            BLOCK=BLOCK)  # fmt: skip
    return y
