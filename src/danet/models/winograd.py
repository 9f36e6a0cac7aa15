"""Winograd F(4x4, 3x3) convolution for the CPU: the same 3x3 convolutions in 2.25x fewer multiplications.

DANet's time on a CPU is in its 3x3 convolutions (the head's two 2048->512 ones alone are ~36 % of an inference),
and oneDNN's direct float32 kernels already run them at the cores' FMA peak. The only way to go faster without
changing what is computed is to compute it with fewer multiplications: Winograd's minimal filtering algorithm
(Lavin & Gray, CVPR 2016) gets each 4x4 output tile from a 6x6 input tile with 36 products per channel pair
instead of 144. The products become 36 independent GEMMs, (tiles x C_in) @ (C_in x C_out), which run at BLAS
speed; the tile transforms are small GEMMs over the 36 tile values.

Dilated convolutions (DANet's stages 3 and 4 at output stride 8/16) split into dilation^2 interleaved phases, each
a plain 3x3 convolution; the tile gather below reads every phase at once.

Numerics: float32 results differ from the direct convolution by ~3e-6 relative (the transforms have entries up to
5 and 1/24), against ~1.5e-7 for the direct kernel; cuDNN's Winograd and TF32 kernels, which the toolboxes use on
GPUs by default, differ by more. In float64 it equals the direct convolution to ~1e-15.

Used only where it pays: float32/float64 on the CPU, outside autocast and torch.compile, 3x3 stride-1 convolutions
with padding == dilation and at least `MIN_CHANNELS` input and output channels; anything else runs `F.conv2d`.
Training works: the backward is Winograd too (the adjoint transforms and two more batched GEMMs).
"""

from __future__ import annotations

import torch
from torch import nn

from .amp import autocast_dtype

MIN_CHANNELS = 256  # below this the transforms cost more than the multiplications they save (measured, 1 thread)
M = 4  # output tile size: F(4x4, 3x3)
A = M + 2  # input tile size
CHUNK_BYTES = 128 * 2**20  # inference: transformed tiles per chunk (see _inference)

# F(4, 3) with interpolation points 0, +-1, +-2 and infinity.
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]
_MATS: dict = {}


def _mats(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms as Kronecker products: input (36, 36), weight (36, 9), output (16, 36)."""
    if dtype not in _MATS:
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in (_BT, _G, _AT))
        _MATS[dtype] = tuple(torch.kron(t, t).to(dtype) for t in (bt, g, at))
    return _MATS[dtype]


class _Geometry:
    """Tiling of an (N, C, H, W) input for a 3x3 convolution with dilation d and padding d.

    Output rows are padded up to Ht, a multiple of d * 4; phase p (rows p, p + d, ...) of tile row ty covers output
    rows (ty * 4 + i) * d + p, i < 4, and reads padded input rows (ty * 4 + u) * d + p, u < 6. T counts the tiles
    of all images and phases, ordered (n, p, q, ty, tx).
    """

    def __init__(self, shape: torch.Size, d: int) -> None:
        self.n, self.c, self.h, self.w = shape
        self.d = d
        step = d * M
        self.ht, self.wt = -(-self.h // step) * step, -(-self.w // step) * step
        self.th, self.tw = self.ht // step, self.wt // step
        self.tiles = self.n * d * d * self.th * self.tw

    def padded(self, like: torch.Tensor) -> torch.Tensor:
        """A zeroed (N, Ht + 2d, Wt + 2d, C) buffer (channels innermost)."""
        return like.new_zeros(self.n, self.ht + 2 * self.d, self.wt + 2 * self.d, self.c)

    def tile_view(self, xp: torch.Tensor, u: int | None = None, v: int | None = None) -> torch.Tensor:
        """Overlapping view (6, 6, N, d, d, th, tw, C) of the padded buffer; with u, v: one tile element, no overlap."""
        sn, sh, sw, sc = xp.stride()
        d = self.d
        size = (self.n, d, d, self.th, self.tw, self.c)
        stride = (sn, sh, sw, M * d * sh, M * d * sw, sc)
        if u is None:
            return xp.as_strided((A, A) + size, (d * sh, d * sw) + stride)
        return xp.as_strided(size, stride, xp.storage_offset() + u * d * sh + v * d * sw)

    def output_view(self, out: torch.Tensor) -> torch.Tensor:
        """(N, Ht, Wt, C_out) buffer viewed as (4, 4, N, d, d, th, tw, C_out), the tile order of the GEMMs."""
        n, d = self.n, self.d
        return out.view(n, self.th, M, d, self.tw, M, d, out.shape[-1]).permute(2, 5, 0, 3, 6, 1, 4, 7)


def _padded_input(x: torch.Tensor, g: _Geometry) -> torch.Tensor:
    xp = g.padded(x)
    xp[:, g.d : g.d + g.h, g.d : g.d + g.w].copy_(x.permute(0, 2, 3, 1))
    return xp


def _transform_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Tile view (6, 6, ..., C) -> V (36, tiles, C); the reshape is the one gather copy."""
    bb, _, _ = _mats(tiles.dtype)
    c = tiles.shape[-1]
    return (bb @ tiles.reshape(A * A, -1)).view(A * A, -1, c)


def _input_transform(x: torch.Tensor, g: _Geometry) -> torch.Tensor:
    """(N, C, H, W) -> V (36, T, C)."""
    return _transform_tiles(g.tile_view(_padded_input(x, g)))


def _input_transform_adjoint(dv: torch.Tensor, g: _Geometry, memory_format: torch.memory_format) -> torch.Tensor:
    """dV (36, T, C) -> dx (N, C, H, W): the transposed transform, then the overlapping tiles summed back."""
    bb, _, _ = _mats(dv.dtype)
    dtiles = (bb.T @ dv.view(A * A, -1)).view(A, A, g.n, g.d, g.d, g.th, g.tw, g.c)
    dxp = g.padded(dv)
    for u in range(A):
        for v in range(A):
            g.tile_view(dxp, u, v).add_(dtiles[u, v])
    d = g.d
    return dxp[:, d : d + g.h, d : d + g.w].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def weight_transform(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> U (36, C_in, C_out)."""
    co, ci = w.shape[:2]
    _, gg, _ = _mats(w.dtype)
    # NOTE: transpose the 9-wide weight, not the 36-wide result: the transposing copy is the slow part.
    return (gg @ w.permute(2, 3, 1, 0).reshape(9, ci * co)).view(A * A, ci, co)


def _weight_transform_adjoint(du: torch.Tensor) -> torch.Tensor:
    """dU (36, C_in, C_out) -> dw (C_out, C_in, 3, 3)."""
    _, gg, _ = _mats(du.dtype)
    ci, co = du.shape[1:]
    return (gg.T @ du.reshape(A * A, ci * co)).view(3, 3, ci, co).permute(3, 2, 0, 1).contiguous()


def _untransform_tiles(m: torch.Tensor, dest: torch.Tensor) -> None:
    """M (36, tiles, C_out) -> the output tiles, written into `dest`, a (4, 4, ..., C_out) view of the output."""
    _, _, aa = _mats(m.dtype)
    dest.copy_((aa @ m.view(A * A, -1)).view(dest.shape))


def _finish(out: torch.Tensor, g: _Geometry, memory_format: torch.memory_format) -> torch.Tensor:
    """(N, Ht, Wt, C_out) -> (N, C_out, H, W) in the input's memory format."""
    return out[:, : g.h, : g.w].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def _output_transform(m: torch.Tensor, g: _Geometry, memory_format: torch.memory_format) -> torch.Tensor:
    """M (36, T, C_out) -> y (N, C_out, H, W)."""
    out = m.new_empty(g.n, g.ht, g.wt, m.shape[-1])
    _untransform_tiles(m, g.output_view(out))
    return _finish(out, g, memory_format)


def _inference(x: torch.Tensor, u: torch.Tensor, g: _Geometry, memory_format: torch.memory_format) -> torch.Tensor:
    """The forward without autograd, in chunks of tile rows: V and M stay under CHUNK_BYTES for large images.

    NOTE: every chunk reads all of U (151 MB for a 2048->512 convolution), so chunks are large (~CHUNK_BYTES of
    V): that costs one more read of U per 128 MB of V, and keeps a whole 1024x2048 image from holding ~1.2 GB of
    tiles at once.
    """
    xp = _padded_input(x, g)
    tv = g.tile_view(xp)  # (6, 6, N, d, d, th, tw, C)
    out = x.new_empty(g.n, g.ht, g.wt, u.shape[-1])
    ov = g.output_view(out)  # (4, 4, N, d, d, th, tw, C_out)
    row_bytes = A * A * g.d * g.d * g.tw * max(g.c, u.shape[-1]) * x.element_size()
    if row_bytes * g.th * g.n <= CHUNK_BYTES:  # all at once: U is read once
        _untransform_tiles(torch.bmm(_transform_tiles(tv), u), ov)
        return _finish(out, g, memory_format)
    rows = max(1, CHUNK_BYTES // row_bytes)
    for n in range(g.n):
        for t0 in range(0, g.th, rows):
            t1 = min(g.th, t0 + rows)
            v = _transform_tiles(tv[:, :, n, :, :, t0:t1])
            _untransform_tiles(torch.bmm(v, u), ov[:, :, n, :, :, t0:t1])
    return _finish(out, g, memory_format)


def _output_transform_adjoint(dy: torch.Tensor, g: _Geometry) -> torch.Tensor:
    """dy (N, C_out, H, W) -> dM (36, T, C_out)."""
    co = dy.shape[1]
    full = dy.new_zeros(g.n, g.ht, g.wt, co)
    full[:, : g.h, : g.w].copy_(dy.permute(0, 2, 3, 1))
    tiles = g.output_view(full).reshape(M * M, -1)
    _, _, aa = _mats(dy.dtype)
    return (aa.T @ tiles).view(A * A, g.tiles, co)


def _format_of(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """The output's memory format, as `F.conv2d` picks it: channels_last if the input or the weight is."""

    def channels_last(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    return torch.channels_last if channels_last(x) or channels_last(w) else torch.contiguous_format


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, u, dilation: int):
        g = _Geometry(x.shape, dilation)
        fmt = _format_of(x, weight)
        if u is None:
            u = weight_transform(weight)
        if not any(ctx.needs_input_grad[:2]):
            return _inference(x, u, g, fmt)
        v = _input_transform(x, g)
        y = _output_transform(torch.bmm(v, u), g, fmt)
        ctx.geometry, ctx.fmt = g, fmt
        ctx.save_for_backward(v, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        v, u = ctx.saved_tensors
        g = ctx.geometry
        dm = _output_transform_adjoint(dy, g)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _input_transform_adjoint(torch.bmm(dm, u.transpose(1, 2)), g, ctx.fmt)
        if ctx.needs_input_grad[1]:
            dw = _weight_transform_adjoint(torch.bmm(v.transpose(1, 2), dm))
        return dx, dw, None, None


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1, u: torch.Tensor | None = None):
    """`F.conv2d(x, weight, padding=dilation, dilation=dilation)` by Winograd F(4x4, 3x3).

    x `(N, C_in, H, W)` (contiguous or channels_last; the output has the same format), weight `(C_out, C_in, 3, 3)`;
    `u`: the weight already transformed by `weight_transform` (inference cache). Differentiable in x and weight.
    """
    return _WinogradConv.apply(x, weight, u, dilation)


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (same parameters and state-dict keys) that runs by Winograd where that is faster.

    Made by `use_winograd`, which changes the class of existing convolutions in place. In inference (no grad) the
    transformed weight is cached, keyed on the weight's version so an in-place update, an optimiser step or a new
    state dict is seen, and dropped by `.to()` / `.float()` / `.double()` ... (`_apply`). NOTE: writes through
    `weight.data` bypass the version counter; after one, call `use_winograd(model, False)` and switch back.
    """

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_winograd_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _winograd_ok(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and self.weight.dtype == x.dtype
            and autocast_dtype("cpu") is None
            and x.dim() == 4
            and not torch.compiler.is_compiling()  # NOTE: dynamo cannot trace this autograd.Function (torch 2.13)
        )

    def _transformed(self) -> torch.Tensor | None:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return None
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype)
        cache = getattr(self, "_winograd_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, weight_transform(w.detach()))
            self._winograd_cache = cache
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._winograd_ok(x):
            return super().forward(x)
        y = winograd_conv2d(x, self.weight, self.dilation[0], self._transformed())
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


def eligible(conv: nn.Module) -> bool:
    """A 3x3, stride-1, ungrouped, zero-padded 'same' convolution with enough channels to pay."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.dilation[0] == conv.dilation[1]
        and conv.padding == conv.dilation
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    )


def use_winograd(model: nn.Module, enabled: bool = True) -> int:
    """Switch the model's eligible convolutions to `WinogradConv2d` (or back). Returns how many were switched.

    Parameters, buffers and state-dict keys are unchanged; only the algorithm differs (see the module docstring).
    """
    count = 0
    for conv in model.modules():
        if enabled and type(conv) is nn.Conv2d and eligible(conv):
            conv.__class__ = WinogradConv2d
            count += 1
        elif not enabled and type(conv) is WinogradConv2d:
            conv.__class__ = nn.Conv2d
            conv.__dict__.pop("_winograd_cache", None)
            count += 1
    return count


def set_inference_conv(model: nn.Module, conv: str) -> nn.Module:
    """`danet test` / `predict` `--conv`: "direct" leaves the model; "winograd" switches it and makes it channels_last.

    channels_last makes the Winograd tile gather and output copies plain copies (NHWC is their working layout):
    ~6 % faster at 256x256 and ~8 % at 512x1024 (R50-D8, CPU), where the direct model gains nothing from it.
    """
    if conv == "winograd":
        use_winograd(model)
        model.to(memory_format=torch.channels_last)
    return model
