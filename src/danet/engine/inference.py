"""One forward's worth of inference: autocast, whole-image logits, sliding windows, TTA rescaling and a
memory-bounded upsample + argmax (engine.evaluate builds multi-scale + flip and the metric on these).

Slide (both toolboxes): windows of the crop size every `stride` pixels, the last window of a row/column pulled back
inside the image; overlapping logits are averaged; a window larger than the image is cut to the image (no padding).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DanetError
from ..models.danet import unwrap, upsample_logits

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp / amp= -> the autocast's dtype


def autocast(device: torch.device, amp: str = "none"):
    """The autocast context for "none" | "bf16" | "fp16"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def forward_logits(model: nn.Module, image: torch.Tensor, amp: str = "none", resize: bool = True) -> torch.Tensor:
    """`(B, 3, h, w)` -> `(B, K, h, w)` logits of the main output (resize=False: at the model's output stride);
    float32, or float64 from a float64 model."""
    with autocast(image.device, amp):
        out = model(image, resize=resize)["out"]
    return out if out.dtype == torch.float64 else out.float()


# windows per forward in slide mode on a GPU: as many as fit in this many input pixels (one whole Cityscapes image)
SLIDE_BATCH_PIXELS = 2048 * 1024


def windows_per_forward(device: torch.device, images: int, window: tuple[int, int]) -> int:
    """Default windows per forward: on a GPU as many as fit in SLIDE_BATCH_PIXELS (a batch-1 forward there is bound
    by kernel launches); on the CPU one (stacking 9 windows of 256x512 was 1.26x slower with twice the memory)."""
    if device.type == "cpu":
        return 1
    return max(1, SLIDE_BATCH_PIXELS // (images * window[0] * window[1]))


def check_slide(crop: tuple[int, int], stride: tuple[int, int] | None) -> None:
    """DanetError unless the windows are at least 1 x 1 and the stride at most the window (else pixels between
    windows would get no logits)."""
    if len(crop) != 2 or min(crop) < 1:
        raise DanetError(f"slide window {list(crop)} needs two positive sizes H W")
    if stride is not None and (len(stride) != 2 or min(stride) < 1 or stride[0] > crop[0] or stride[1] > crop[1]):
        raise DanetError(
            f"slide stride {list(stride)} must be 1..{crop[0]} x 1..{crop[1]} (at most the window {list(crop)}, so "
            "the windows cover every pixel)"
        )


def slide_windows(
    size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, row by row; all of one size: the crop, or the image where it is smaller."""
    check_slide(crop, stride)
    (h, w), (ch, cw), (sh, sw) = size, crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def slide_logits(
    model: nn.Module,
    image: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    amp: str = "none",
    window_batch: int | None = None,
) -> torch.Tensor:
    """Sliding-window logits `(B, K, h, w)` of `(B, 3, h, w)`, windows `crop` (H, W) every `stride` (H, W).

    `window_batch` windows (of every image of the batch) go through the model in one forward; None:
    `windows_per_forward`. The windows' logits are added in the same order whatever the grouping.
    """
    b, _, h, w = image.shape
    boxes = slide_windows((h, w), crop, stride)
    y1, y2, x1, x2 = boxes[0]
    per = window_batch or windows_per_forward(image.device, b, (y2 - y1, x2 - x1))
    logits = None
    count = image.new_zeros((b, 1, h, w))
    for start in range(0, len(boxes), per):
        group = boxes[start : start + per]
        views = [image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group]
        out = forward_logits(model, views[0] if len(views) == 1 else torch.cat(views), amp)
        if logits is None:
            logits = out.new_zeros((b, out.shape[1], h, w))
        for j, (y1, y2, x1, x2) in enumerate(group):
            logits[:, :, y1:y2, x1:x2] += out[j * b : (j + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """Two thirds of the crop, rounded, as mmseg's slide configs: 512 -> 341, 1024 -> 683, 769 -> 513."""
    return (max(1, round(crop[0] * 2 / 3)), max(1, round(crop[1] * 2 / 3)))


def infer(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    amp: str = "none",
    resize: bool = True,
) -> torch.Tensor:
    """Logits `(B, K, h, w)` of a normalised `(B, 3, h, w)` batch, whole-image or sliding-window. resize=False: a
    whole image's logits at the model's output stride (to be resized once, to the label size, as sssegmentation
    tests); slide windows are resized to their window either way (both toolboxes do)."""
    if mode == "slide":
        assert crop is not None, "slide inference needs a crop size"
        return slide_logits(model, image, crop, stride or default_stride(crop), amp)
    return forward_logits(model, image, amp, resize)


def align_corners(model: nn.Module) -> bool:
    """The model's final resize setting (`ModelConfig.align_corners`), through DDP / compile wrappers."""
    return bool(getattr(getattr(unwrap(model), "cfg", None), "align_corners", False))


def rescale(image: torch.Tensor, s: float) -> torch.Tensor:
    """A TTA view: `image` `(B, C, h, w)` resized bilinearly by the factor `s`, as both toolboxes do (its sides
    floor(h * s), floor(w * s)); a side that would be 0 pixels (a sliver of an image) is 1."""
    h, w = image.shape[-2:]
    if math.floor(h * s) >= 1 and math.floor(w * s) >= 1:
        return F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def upsample_argmax(
    logits: torch.Tensor, out_size: tuple[int, int], max_elems: int = 1 << 26, corners: bool = False
) -> torch.Tensor:
    """argmax over K of `(K, h, w)` logits resized bilinearly (align_corners=`corners`) to `out_size` -> `(H, W)`
    int64.

    Computed in horizontal strips so a huge output never holds K x H x W floats at once (identical to
    F.interpolate + argmax: each output row only reads its two source rows).
    """
    k, h, w = logits.shape
    out_h, out_w = out_size
    if k * out_h * out_w <= max_elems:
        return upsample_logits(logits[None], out_size, corners)[0].argmax(0)
    # NOTE: PyTorch's source coordinate: align_corners=False (dst + 0.5) * in / out - 0.5, clamped at 0;
    # align_corners=True dst * (in - 1) / (out - 1) (0 for one output row)
    dst = torch.arange(out_h, dtype=torch.float64)
    if corners:
        ys = dst * ((h - 1) / (out_h - 1)) if out_h > 1 else dst * 0
    else:
        ys = ((dst + 0.5) * (h / out_h) - 0.5).clamp_min(0)
    y0 = ys.floor().long().clamp_max(h - 1)
    y1 = (y0 + 1).clamp_max(h - 1)
    wy = (ys - y0).to(logits.dtype)
    rows_per_strip = max(1, max_elems // (k * out_w))
    result = torch.empty((out_h, out_w), dtype=torch.long, device=logits.device)
    for start in range(0, out_h, rows_per_strip):
        sl = slice(start, min(start + rows_per_strip, out_h))
        a, b, t = logits[:, y0[sl]], logits[:, y1[sl]], wy[sl].to(logits.device)[None, :, None]
        strip = a + (b - a) * t  # (K, rows, w): rows interpolated
        strip = upsample_logits(strip[None], (strip.shape[1], out_w), corners)[0]
        result[sl] = strip.argmax(0)
    return result
