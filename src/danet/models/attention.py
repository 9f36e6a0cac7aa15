"""The two attention modules of DANet: position attention (PAM) and channel attention (CAM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm_kernels import interpreted, triton

# inference (no gradients): the channel attention's residual in its matrix multiply's epilogue (`baddbmm`) rather than
# an `addcmul` pass after it (on an H200, a whole 1024x2048 image: 8.56 -> 8.41 ms, 2026-11-27)
GEMM_RESIDUAL = True


class PositionAttention(nn.Module):
    """Position attention module: every position attends to every other position.

    energy = Q^T K over the N = H*W positions, softmax over the key positions, out = gamma * (V attn^T) + x.
    NOTE: there is no 1/sqrt(d) scaling in DANet; `scale=1` below is deliberate.

    With `fused=True` (default) the product runs through `scaled_dot_product_attention`, so the N x N attention
    matrix is never materialised (flash / memory-efficient kernels). The value's channels are split into heads
    as wide as the query (64 in DANet): every head shares the same Q and K, hence the same attention weights,
    so the result is unchanged, and the 64-wide heads reach the flash kernel on GPUs.

    With `triton=True` (`DANet.set_attention("triton")`) a forward without gradients on CUDA in bf16 / fp16 (under
    autocast) runs one Triton kernel over the whole 512-wide value instead (`models/triton_attention.py`: q k^T
    twice, not 8 times); anything else (training, float32, the CPU unless TRITON_INTERPRET=1 runs the kernel through
    Triton's interpreter, as the tests do) takes the path above.

    Args:
        channels: input/value channels C.
        key_channels: query/key channels (64 in DANet).
        bias: whether the three 1x1 projections have a bias (mmseg: yes, sssegmentation: no).
        fused: use fused attention instead of the explicit softmax(QK^T)V.

    Forward: `(B, C, H, W)` -> `(B, C, H, W)`.
    """

    def __init__(self, channels: int, key_channels: int = 64, bias: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.query_project = nn.Conv2d(channels, key_channels, 1, bias=bias)
        self.key_project = nn.Conv2d(channels, key_channels, 1, bias=bias)
        self.value_project = nn.Conv2d(channels, channels, 1, bias=bias)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.fused = fused
        self.triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query_project(x).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.key_project(x).flatten(2).transpose(1, 2)  # (B, N, d)
        v = self.value_project(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if self.triton and triton_runs(v):
            from . import triton_attention as TA

            xt = x.flatten(2).transpose(1, 2)  # (B, N, C): a view, contiguous in C where x is channels last
            if TA.FUSE_RESIDUAL and xt.stride(-1) == 1 and xt.dtype == v.dtype:
                return TA.attend_triton(q, k, v, xt, self.gamma).transpose(1, 2).reshape(b, c, h, w)
            out = TA.attend_triton(q, k, v)
        else:
            out = attend(q, k, v) if self.fused else attend_explicit(q, k, v)  # (B, N, C)
        return residual(x, self.gamma, out.transpose(1, 2).reshape(b, c, h, w))


def residual(x: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x + gamma * out, both modules' output, in one elementwise pass (`addcmul`; gamma in out's dtype, as
    `gamma * out` computes it: a 0-dim tensor takes the other operand's dtype) where `gamma * out + x` took two, the
    first of them casting gamma for each element (a whole 1024x2048 image on an H200: 64 us each multiply, 54 each
    add). The same values but the rounding of the product, which is no longer rounded apart from the sum."""
    return torch.addcmul(x, out, gamma.to(out.dtype))


def triton_runs(v: torch.Tensor) -> bool:
    """Whether `attention="triton"` runs its kernel on this value: Triton installed, no gradients, bf16 / fp16, on
    CUDA (or through Triton's CPU interpreter, TRITON_INTERPRET=1, as the tests run it)."""
    if triton is None or torch.is_grad_enabled() or v.dtype not in (torch.bfloat16, torch.float16):
        return False
    return v.is_cuda or interpreted()


def attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v with the (B, N, N) matrix in memory, exactly as the reference toolboxes compute it.

    q, k: `(B, N, d)`; v: `(B, N, C)` -> `(B, N, C)`.
    """
    attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    return torch.bmm(attn, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused softmax(q k^T) v (no scaling) without the N x N matrix.

    q, k: `(B, N, d)`; v: `(B, N, C)` -> `(B, N, C)`. When d divides C, v is viewed as C/d heads of width d that
    share q and k (same attention weights, so the same result) to reach the flash kernels.
    """
    b, n, d = q.shape
    c = v.shape[-1]
    # NOTE: the fused kernels (CPU flash, CUDA flash / mem-efficient) need a unit stride on the last dim; the
    # projections arrive as transposed views (stride N there), which silently selects the math fallback that
    # materialises heads x N x N. These copies are N x (2d + C), negligible next to N x N.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if c % d == 0:  # C/d heads of width d sharing q and k
        heads = c // d
        qh, kh = q.unsqueeze(1).expand(b, heads, n, d), k.unsqueeze(1).expand(b, heads, n, d)
        vh = v.reshape(b, n, heads, d).transpose(1, 2)
    else:  # one head of the whole width (slower kernels, same result)
        qh, kh, vh = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, heads, N, C / heads)
    return out.transpose(1, 2).reshape(b, n, c)


class ChannelAttention(nn.Module):
    """Channel attention module: every channel attends to every other channel.

    energy = X X^T (C x C); attention = softmax(max(energy, -1) - energy, -1); out = gamma * (attention X) + x.

    Forward: `(B, C, H, W)` -> `(B, C, H, W)`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # inference: x + (gamma attn) x as one `baddbmm` (the product reads x as its C, beta = 1), not a product and
        # then an `addcmul` over the map
        gemm = GEMM_RESIDUAL and not torch.is_grad_enabled()
        if x.is_contiguous(memory_format=torch.channels_last):
            # NOTE: channels last: (attn x)^T = x^T attn^T, written (B, N, C), which is x's own layout; attn x
            # written (B, C, N) was an NCHW map beside a channels-last x: the residual's add ran on two layouts and
            # the next convolution copied its input to channels last (the same products, each value its own dot
            # product)
            xt = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
            attn = self._attention(xt.transpose(1, 2))
            if gemm:
                out = torch.baddbmm(xt, xt, (attn * self.gamma).transpose(1, 2))
                return out.reshape(b, h, w, c).permute(0, 3, 1, 2)
            out = torch.bmm(xt, attn.transpose(1, 2)).reshape(b, h, w, c).permute(0, 3, 1, 2)
            return residual(x, self.gamma, out)
        q = x.reshape(b, c, h * w)
        attn = self._attention(q)
        if gemm:
            return torch.baddbmm(q, attn * self.gamma, q).reshape(b, c, h, w)
        return residual(x, self.gamma, torch.bmm(attn, q).reshape(b, c, h, w))

    @staticmethod
    def _attention(q: torch.Tensor) -> torch.Tensor:
        """softmax(rowmax(E) - E), E = q q^T: `(B, C, N)` -> `(B, C, C)`."""
        energy = torch.bmm(q, q.transpose(1, 2))  # (B, C, C)
        # NOTE: both toolboxes subtract the energy from its row maximum before the softmax (kept for parity).
        energy = torch.amax(energy, dim=-1, keepdim=True).expand_as(energy) - energy
        return torch.softmax(energy, dim=-1)
