"""DANet's training loss computed from the 1/8-size logits, without the full-size logits of the whole batch.

`engine.losses.danet_loss` upsamples the four outputs {"out", "pam", "cam", "aux"} to the label size and takes
their cross-entropy: four `(B, K, H, W)` float32 tensors, their log-softmax and, in backward, their gradients (at
512x512, batch 8, 150 classes: 1.26 GB each). The same value, to rounding, without any of them:

- `fused_danet_loss(..., impl="chunked")`: `UpsampledCrossEntropy`, an autograd function that upsamples one image
  (CPU: one band of rows that stays in cache) at a time, in forward and again in backward; on CUDA the upsample and
  its adjoint run as small GEMMs (`upsample_nhwc`), aten's kernels for them being 5-10x off memory speed there;
- `fused_danet_loss(..., impl="compiled")`: `torch.compile` of the per-image upsample + cross-entropy, which
  fuses the upsample into the softmax and its gradient (GPU: no full-size tensor at all).

Used by `danet train --set fused_loss=true` and `danet benchmark --loss fused|compiled`; the model is then called with
`resize=False`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DanetError
from .losses import WEIGHTS, grouped_mean

BAND_BYTES = 16 << 20  # CPU: upsampled logits per band of the chunked loss (kept in cache)
COMPILE_BACKEND = "inductor"  # of the "compiled" implementation (tests use a faster one)
GEMM_PATH = "cuda"  # where the chunked loss upsamples with small GEMMs: "cuda", "always" (tests) or "never"
_compiled: dict = {}


# ---------------------------------------------------------------------------------------------------------------
def _bands(h: int, w: int, size: tuple[int, int], k: int, device: torch.device) -> list[tuple[int, int]]:
    """Row bands `[r0, r1)` of the `h` input rows whose upsampled rows are processed together.

    CUDA: the whole image (one band). CPU: bands of about 4 MB of upsampled logits, which stay in cache; only when
    the output height is an exact multiple s of `h` (then band and whole-image upsampling give the same values).
    """
    s = size[0] // h
    if device.type == "cuda" or s * h != size[0]:
        return [(0, h)]
    rows = max(1, BAND_BYTES // (k * size[1] * 4 * s))
    return [(r, min(r + rows, h)) for r in range(0, h, rows)]


def _upsample_band(z: torch.Tensor, r0: int, r1: int, size: tuple[int, int]):
    """Upsampled rows of input rows [r0, r1) of z `(1, K, h, w)`.

    Returns (up `(1, K, R, W)` channels_last, the upsample of input rows [a, b) = [r0 - 1, r1 + 1] clipped, and the
    slice of up's rows that belong to [r0, r1)). NOTE: input row a's neighbours must be present for the kept rows to
    equal the whole-image upsample (align_corners=False clamps at the slice border); the halo rows are discarded.
    """
    h = z.shape[2]
    s = size[0] // h
    a, b = (r0, r1) if (r0, r1) == (0, h) else (max(r0 - 1, 0), min(r1 + 1, h))
    out_rows = size[0] if (a, b) == (0, h) else s * (b - a)
    up = F.interpolate(z[:, :, a:b], size=(out_rows, size[1]), mode="bilinear", align_corners=False)
    return up, (a, b), slice(s * (r0 - a), s * (r0 - a) + (size[0] if (a, b) == (0, h) else s * (r1 - r0)))


# ---------------------------------------------------------------------------------------------------------------
# Bilinear upsampling by an integer factor (align_corners=False) and its transpose as small GEMMs, channels last.
# NOTE: aten's CUDA kernels for these run at ~0.4 TB/s (upsample) and through atomics (its backward); as GEMMs over
# rows of K they run at memory speed. Each output row (column) m of input row r's block of s rows (columns) takes
# input rows r-1, r, r+1 with weights max(-u, 0), 1 - |u|, max(u, 0), u = (m + 0.5) / s - 0.5; the borders clamp
# (row -1 is row 0, row h is row h-1), as aten's source-index clamp does. Same values as F.interpolate to rounding.
# NOTE: float32 GEMMs; if a user turns on TF32 matmuls (torch.backends.cuda.matmul.allow_tf32) they round to TF32.
# ---------------------------------------------------------------------------------------------------------------
_WEIGHTS_CACHE: dict = {}


def _weights(s: int, ref: torch.Tensor) -> torch.Tensor:
    """(3, s): shares of input rows r-1, r, r+1 in the s output rows of block r (on ref's device, in its dtype)."""
    key = (s, ref.device, ref.dtype)
    if key not in _WEIGHTS_CACHE or torch.compiler.is_compiling():
        u = (torch.arange(s, dtype=torch.float64) + 0.5) / s - 0.5
        w = torch.stack([(-u).clamp_min(0), 1 - u.abs(), u.clamp_min(0)]).to(ref.device, ref.dtype)
        if torch.compiler.is_compiling():
            return w
        _WEIGHTS_CACHE[key] = w  # NOTE: a host-to-device copy per call would wait for the GPU's queue each time
    return _WEIGHTS_CACHE[key]


def _neighbours(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with a new axis of 3 after `dim`: entries r-1, r, r+1 along `dim` (clamped at the borders)."""
    n = x.shape[dim]
    pad = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim)
    return torch.stack([pad.narrow(dim, i, n) for i in range(3)], dim + 1)


def upsample_nhwc(z: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """z `(h, w, K)` -> `(h*sh * w*sw, K)`: F.interpolate(bilinear, align_corners=False) by (sh, sw), channels last."""
    h, w, k = z.shape
    cols = torch.matmul(_weights(sw, z).T, _neighbours(z, 1).reshape(h * w, 3, k))  # (h*w, sw, K) = (h, W, K)
    rows = torch.matmul(_weights(sh, z).T, _neighbours(cols.reshape(h, w * sw * k), 0))  # (h, sh, W*K)
    return rows.reshape(-1, k)


def _fold(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with an axis of 3 at `dim` + 1 (shares for r-1, r, r+1 along `dim`) -> summed into the input rows."""
    prev, mid, nxt = t.unbind(dim + 1)
    out = mid.clone()
    n = out.shape[dim]
    out.narrow(dim, 0, n - 1).add_(prev.narrow(dim, 1, n - 1))  # block r's share for row r-1
    out.narrow(dim, 0, 1).add_(prev.narrow(dim, 0, 1))  # row -1 is row 0
    out.narrow(dim, 1, n - 1).add_(nxt.narrow(dim, 0, n - 1))  # block r's share for row r+1
    out.narrow(dim, n - 1, 1).add_(nxt.narrow(dim, n - 1, 1))  # row h is row h-1
    return out


def upsample_nhwc_adjoint(g: torch.Tensor, h: int, w: int, sh: int, sw: int) -> torch.Tensor:
    """The transpose of upsample_nhwc: g `(h*sh * w*sw, K)` -> `(h, w, K)`."""
    k = g.shape[1]
    rows = torch.matmul(_weights(sh, g), g.reshape(h, sh, w * sw * k))  # (h, 3, W*K)
    rows = _fold(rows, 0)  # (h, W*K)
    cols = torch.matmul(_weights(sw, g), rows.view(h * w, sw, k)).view(h, w, 3, k)
    return _fold(cols, 1)


def _gemm_scales(logits: torch.Tensor, size: tuple[int, int]) -> tuple[int, int] | None:
    h, w = logits.shape[-2:]
    on = GEMM_PATH == "always" or (GEMM_PATH == "cuda" and logits.device.type == "cuda")
    return (size[0] // h, size[1] // w) if on and size[0] % h == 0 and size[1] % w == 0 else None


def _gemm_forward(z: torch.Tensor, t: torch.Tensor, ignore_index: int, sh: int, sw: int) -> torch.Tensor:
    """Sum of CE over the labelled pixels of one image: z `(h, w, K)`, t `(H*W,)`."""
    logp = torch.log_softmax(upsample_nhwc(z, sh, sw), 1)  # (H*W, K)
    valid = t != ignore_index
    picked = logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)  # NOTE: not nll_loss: one CUDA block
    return -torch.where(valid, picked, 0).sum()


def _gemm_backward(z: torch.Tensor, t: torch.Tensor, ignore_index: int, sh: int, sw: int) -> torch.Tensor:
    """d(sum)/dz `(h, w, K)` of _gemm_forward: U^T ((softmax - onehot) * labelled)."""
    p = torch.softmax(upsample_nhwc(z, sh, sw), 1)
    valid = (t != ignore_index).to(p.dtype)
    p.scatter_add_(1, torch.where(t != ignore_index, t, 0)[:, None], -valid[:, None])
    p.mul_(valid[:, None])
    return upsample_nhwc_adjoint(p, z.shape[0], z.shape[1], sh, sw)


class UpsampledCrossEntropy(torch.autograd.Function):
    """Sum over the labelled pixels of CE(bilinear_upsample(logits), target), one image (CPU: row band) at a time.

    logits `(B, K, h, w)` (any float dtype; the upsample and the softmax run in float32, float64 for float64),
    target `(B, H, W)` int64 -> 0-d. Forward keeps only the inputs; backward recomputes each band's upsample and
    returns U^T (softmax - onehot) through aten's adjoint of the upsample. Work runs channels-last, so the softmax
    is over contiguous rows of K and the adjoint takes its fast NHWC path.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index: int):
        size = tuple(target.shape[-2:])
        dtype = torch.promote_types(logits.dtype, torch.float32)
        k = logits.shape[1]
        total = torch.zeros((), dtype=dtype, device=logits.device)
        ctx.save_for_backward(logits, target)
        ctx.ignore_index = ignore_index
        scales = _gemm_scales(logits, size)
        with torch.autocast(logits.device.type, enabled=False):
            if scales is not None:  # CUDA: whole images, GEMM upsample
                z_all = logits.to(dtype).permute(0, 2, 3, 1).contiguous()  # (B, h, w, K)
                for i in range(logits.shape[0]):
                    total += _gemm_forward(z_all[i], target[i].reshape(-1), ignore_index, *scales)
                return total
            z_all = logits.to(dtype).contiguous(memory_format=torch.channels_last)
            for i in range(logits.shape[0]):
                for r0, r1 in _bands(logits.shape[2], logits.shape[3], size, k, logits.device):
                    up, _, keep = _upsample_band(z_all[i : i + 1], r0, r1, size)
                    flat = up[:, :, keep].permute(0, 2, 3, 1).reshape(-1, k)  # (pixels, K)
                    t = target[i].reshape(-1)[_pixel_range(r0, r1, logits.shape[2], size)]
                    total += F.nll_loss(torch.log_softmax(flat, 1), t, ignore_index=ignore_index, reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, target = ctx.saved_tensors
        size = tuple(target.shape[-2:])
        dtype = torch.promote_types(logits.dtype, torch.float32)
        _, k, h, w = logits.shape
        grad = torch.zeros(logits.shape, dtype=dtype, device=logits.device).contiguous(
            memory_format=torch.channels_last
        )
        scales = _gemm_scales(logits, size)
        with torch.autocast(logits.device.type, enabled=False):
            if scales is not None:
                z_all = logits.to(dtype).permute(0, 2, 3, 1).contiguous()
                for i in range(logits.shape[0]):
                    g = _gemm_backward(z_all[i], target[i].reshape(-1), ctx.ignore_index, *scales)
                    grad[i] = g.permute(2, 0, 1) * grad_total
                grad = grad.to(logits.dtype)
                return (
                    (grad if logits.is_contiguous(memory_format=torch.channels_last) else grad.contiguous()),
                    None,
                    None,
                )
            z_all = logits.to(dtype).contiguous(memory_format=torch.channels_last)
            for i in range(logits.shape[0]):
                for r0, r1 in _bands(h, w, size, k, logits.device):
                    up, (a, b), keep = _upsample_band(z_all[i : i + 1], r0, r1, size)
                    rows = up.permute(0, 2, 3, 1)  # (1, R, W, K) view, contiguous
                    t = target[i].reshape(-1)[_pixel_range(r0, r1, h, size)]
                    valid = t != ctx.ignore_index
                    p = torch.softmax(rows[:, keep].reshape(-1, k), 1)  # (pixels, K)
                    p.scatter_add_(1, torch.where(valid, t, 0)[:, None], valid.to(dtype).neg_()[:, None])
                    p.mul_((valid.to(dtype) * grad_total)[:, None])  # - onehot; ignored pixels give nothing
                    if keep.stop - keep.start == rows.shape[1]:
                        g_up = p.view(rows.shape).permute(0, 3, 1, 2)  # (1, K, R, W) channels_last
                    else:
                        rows.zero_()  # the halo rows give no gradient
                        rows[:, keep] = p.view(1, -1, size[1], k)
                        g_up = up
                    grad[i : i + 1, :, a:b] += torch.ops.aten.upsample_bilinear2d_backward(
                        g_up, up.shape[-2:], (1, k, b - a, w), False
                    )
        grad = grad.to(logits.dtype)
        return (grad if logits.is_contiguous(memory_format=torch.channels_last) else grad.contiguous()), None, None


def _pixel_range(r0: int, r1: int, h: int, size: tuple[int, int]) -> slice:
    """The flat (row-major) pixel indices of the output rows that input rows [r0, r1) own."""
    if (r0, r1) == (0, h):
        return slice(0, size[0] * size[1])
    s = size[0] // h
    return slice(s * r0 * size[1], s * r1 * size[1])


def image_ce_forward(z: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """One image: z `(1, K, h, w)`, target `(1, H, W)` -> (CE summed over the labelled pixels, logsumexp `(1, H, W)`)
    of the bilinearly upsampled z. Compiled, the upsample is computed inside the reduction (nothing of H x W x K)."""
    up = F.interpolate(z, size=target.shape[-2:], mode="bilinear", align_corners=False)
    lse = torch.logsumexp(up, 1)
    valid = target != ignore_index
    picked = up.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, 0).sum(), lse


def image_ce_backward(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, ignore_index: int):
    """The gradient `(1, K, h, w)` of image_ce_forward's sum times `grad`: U^T ((softmax - onehot) * labelled)."""
    size = target.shape[-2:]
    up = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    classes = torch.arange(z.shape[1], device=z.device).view(1, -1, 1, 1)
    onehot = (classes == target.unsqueeze(1)).to(up.dtype)
    g_up = torch.where((target != ignore_index).unsqueeze(1), (torch.exp(up - lse.unsqueeze(1)) - onehot) * grad, 0)
    (h, w), k = z.shape[-2:], z.shape[1]
    if size[0] % h or size[1] % w:  # no integer scale: aten's adjoint (atomics on CUDA)
        return torch.ops.aten.upsample_bilinear2d_backward(g_up, size, z.shape, False)
    flat = g_up[0].permute(1, 2, 0).reshape(-1, k).contiguous()  # (H*W, K): written once, by the fused kernel
    return upsample_nhwc_adjoint(flat, h, w, size[0] // h, size[1] // w).permute(2, 0, 1).unsqueeze(0)


def _kernels() -> tuple:
    if COMPILE_BACKEND not in _compiled:  # one graph per image shape (dynamic=False): the four outputs share it
        c = lambda f: torch.compile(f, backend=COMPILE_BACKEND, dynamic=False)  # noqa: E731
        _compiled[COMPILE_BACKEND] = (c(image_ce_forward), c(image_ce_backward))
    return _compiled[COMPILE_BACKEND]


class CompiledUpsampledCrossEntropy(torch.autograd.Function):
    """UpsampledCrossEntropy's value and gradient through two torch.compile'd per-image kernels.

    Saves the logits, the target and the per-pixel logsumexp `(B, H, W)`; on a GPU the forward reads only the
    low-resolution logits, and the backward writes one image's `(H*W, K)` gradient once for the GEMM adjoint.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index: int):
        fwd, _ = _kernels()
        z_all = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total, lses = 0, []
        with torch.autocast(logits.device.type, enabled=False):
            for i in range(logits.shape[0]):
                s, lse = fwd(z_all[i : i + 1], target[i : i + 1], ignore_index)
                total, _ = total + s, lses.append(lse)
        ctx.save_for_backward(logits, target, torch.cat(lses))
        ctx.ignore_index = ignore_index
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, target, lse = ctx.saved_tensors
        _, bwd = _kernels()
        z_all = logits.to(torch.promote_types(logits.dtype, torch.float32))
        with torch.autocast(logits.device.type, enabled=False):
            grads = [bwd(z_all[i : i + 1], target[i : i + 1], lse[i : i + 1], grad_total, ctx.ignore_index)
                     for i in range(logits.shape[0])]  # fmt: skip
        return torch.cat(grads).to(logits.dtype), None, None


def _summed_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, impl: str) -> torch.Tensor:
    if impl == "chunked":
        return UpsampledCrossEntropy.apply(logits, target, ignore_index)
    if impl == "compiled":
        return CompiledUpsampledCrossEntropy.apply(logits, target, ignore_index)
    if impl == "triton":
        from .triton_loss import TritonUpsampledCrossEntropy

        return TritonUpsampledCrossEntropy.apply(logits, target, ignore_index)
    raise DanetError(f"unknown fused loss implementation {impl!r}; use 'chunked', 'compiled' or 'triton'")


def fused_danet_loss(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    variant: str = "ssseg",
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    images: int = 0,
    impl: str = "chunked",
) -> dict[str, torch.Tensor]:
    """`engine.losses.danet_loss` computed from the 1/8-size logits of `model(x, resize=False)`.

    outputs: {"out", "pam", "cam", "aux"} of `(B, K, h, w)`; target `(B, H, W)`. Same keys and values as
    danet_loss on the bilinearly resized outputs (to rounding); peak memory of one image's `(K, H, W)` (chunked;
    CPU: one band of rows) instead of the batch's four `(B, K, H, W)` logits, their log-softmax and gradients.
    """
    weights = dict(WEIGHTS, aux=aux_weight)
    parts = {
        f"loss_{k}": grouped_mean(lambda g, v=v: _summed_ce(v[g], target[g], ignore_index, impl), target, variant,
                                  ignore_index, images)
        for k, v in outputs.items()
    }  # fmt: skip
    total = sum(weights[k] * parts[f"loss_{k}"] for k in outputs)
    return {"loss": total, **parts}
