"""Inference and validation: whole-image or sliding-window logits, multi-scale + flip TTA, mIoU over a split.

Facts kept from the reference toolboxes (REFERENCE.md, Data / Metrics; mmseg's EncoderDecoder and SegTTAModel):
- whole: one forward of the keep-ratio-resized image; its output-stride logits resized bilinearly
  (align_corners=False) in one step to the ORIGINAL label size, as sssegmentation tests (resize_logits="once"); mmseg
  resizes them twice, to the input, then to the label ("twice", for mmseg's checkpoints); the metric is taken there.
- slide: windows of the crop size every `stride` pixels, the last window of a row/column pulled back inside the
  image; overlapping logits are averaged; a window larger than the image is cut to the image (no padding).
- TTA: sssegmentation's multi-scale + flip test: the image rescaled by each factor (bilinear on the normalised
  tensor) and flipped; each view's logits resized to the original size and averaged (its default,
  use_probs_before_resize=False). mmseg's (its tta_pipeline and SegTTAModel): each view is the ORIGINAL image (not the
  test-resized one) keep-ratio resized by the factor with OpenCV, sizes rounded as mmcv's Resize(scale_factor=r,
  keep_ratio=True) rounds them (`OriginalViews`), then normalised and flipped; the mean of the views' softmax
  probabilities at the original size (merge="probs"). mmseg 0.x's MultiScaleFlipAug (its published ms+flip figures)
  resized the original image keep-ratio to the test scale times the factor instead (`OriginalViews(base=...)`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import DanetError
from ..models.danet import unwrap
from .transfer import labels_fit_uint8, loader_items


def autocast(device: torch.device, amp: str = "none"):
    """The autocast context for "none" | "bf16" | "fp16"."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# how whole-image logits reach the label size: directly (sssegmentation) or via the input size (mmseg)
RESIZES = ("once", "twice")


def default_resize(ck) -> str:
    """How a checkpoint's toolbox resizes whole-image logits: "twice" (via the input size) for an mmsegmentation file
    (or one converted from it), else "once" (sssegmentation, and this project's runs)."""
    source = ck.meta.get("source") if isinstance(ck.meta.get("source"), dict) else {}
    return "twice" if "mmseg" in (ck.source, source.get("format")) else "once"


# how TTA combines its views: the mean logits (sssegmentation's test, the default) or probabilities (mmseg's rule)
TTA_MERGES = ("logits", "probs")
# what TTA rescales: the test-resized, normalised image (sssegmentation), the original image by the factor (mmseg),
# or the original image to the base size times the factor (mmseg 0.x)
TTA_VIEWS = ("resized", "original", "base")


def default_tta(ck) -> tuple[str, str]:
    """(views, merge) of a checkpoint's toolbox's own multi-scale + flip test: ("original", "probs") for an
    mmsegmentation file (or one converted from it), else ("resized", "logits") (sssegmentation, this project)."""
    return ("original", "probs") if default_resize(ck) == "twice" else ("resized", "logits")


@dataclass(frozen=True)
class OriginalViews:
    """mmseg's TTA views of one image: `view(s)` is the original RGB uint8 `(H, W, 3)` image resized as mmcv's
    Resize(scale_factor=s, keep_ratio=True) resizes it (target (int(W s + 0.5), int(H s + 0.5)), then the keep-ratio
    rule of `keep_ratio_size`, OpenCV bilinear on uint8), normalised: `(1, 3, h, w)` of `dtype` on `device`.
    With `base` (LONG, SHORT) the target is (int(LONG s), int(SHORT s)) instead: mmseg 0.x's MultiScaleFlipAug of
    the test scale `base`, whose views its keep-ratio Resize makes by the same rule."""

    image: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    base: tuple[int, int] | None = None

    def size(self, s: float) -> tuple[int, int]:
        """(h, w) of `view(s)`. NOTE: a target side of 0 (a sliver of an image at a small scale, where mmcv fails)
        counts as 1, so the view keeps its other side as `rescale` does, rather than becoming 1 x 1."""
        from ..data.transforms import keep_ratio_size

        h, w = self.image.shape[:2]
        target = (int(self.base[0] * s), int(self.base[1] * s)) if self.base else (int(w * s + 0.5), int(h * s + 0.5))
        new_w, new_h = keep_ratio_size(h, w, (max(1, target[0]), max(1, target[1])))
        return new_h, new_w

    def view(self, s: float) -> torch.Tensor:
        import cv2

        from ..data.transforms import normalize

        h, w = self.image.shape[:2]
        new_h, new_w = self.size(s)
        image = self.image
        if (new_h, new_w) != (h, w):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x = normalize(image, self.mean, self.std)[None].to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.inference_mode()
def segment(
    model: nn.Module,
    image: torch.Tensor | OriginalViews,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "none",
    merge: str = "logits",
    resize_logits: str = "once",
) -> torch.Tensor:
    """Scores `(B, K, H, W)` at `out_size` (H, W) of a normalised `(B, 3, h, w)` image: argmax them for labels.
    An `OriginalViews` instead makes every scale's view from the original image (mmseg's TTA; without its `base`
    the 1.0 view is the original image itself). `resize_logits`: a view's output-stride logits go to `out_size` "once"
    (sssegmentation) or "twice", through the view's own size (mmseg's EncoderDecoder); slide windows' logits are at
    the view's size either way.

    Without TTA (one scale, no flip) these are the logits; with TTA, the mean over the views of the logits
    (merge="logits", sssegmentation's test) or of the softmax probabilities (merge="probs", mmseg's rule).
    """
    if merge not in TTA_MERGES:
        raise DanetError(f"TTA merge must be one of {', '.join(TTA_MERGES)}, got {merge!r}")
    if resize_logits not in RESIZES:
        raise DanetError(f"logits resize must be one of {', '.join(RESIZES)}, got {resize_logits!r}")
    tta = len(scales) > 1 or flip or tuple(scales) != (1.0,)
    corners = align_corners(model)
    total = None
    views = 0
    for s in scales:
        if isinstance(image, OriginalViews):
            scaled = image.view(s)
        else:
            scaled = image if s == 1.0 else rescale(image, s)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = infer(model, x, mode, crop, stride, amp, resize=False)  # whole: at the output stride
            if flipped:
                logits = logits.flip(-1)
            if resize_logits == "twice" and logits.shape[-2:] != x.shape[-2:]:
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=corners)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=corners)
            score = logits.softmax(dim=1) if tta and merge == "probs" else logits
            total = score if total is None else total + score
            views += 1
    return total / views if tta else total


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
        return F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=corners)[0].argmax(0)
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
        strip = F.interpolate(strip[None], size=(strip.shape[1], out_w), mode="bilinear", align_corners=corners)[0]
        result[sl] = strip.argmax(0)
    return result


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset,
    num_classes: int,
    *,
    device: torch.device,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "none",
    channels_last: bool = False,
    ignore_index: int = 255,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "val",
    workers: int | None = None,
    merge: str = "logits",
    resize_logits: str = "once",
    views: str = "resized",
):
    """mIoU etc. of `model` on a val dataset (items: normalised `(3, h, w)` image, `(H, W)` label at original size).
    views="original" (with TTA): each scale's view is made from the image as read (`OriginalViews`, mmseg's TTA);
    views="base": from the image as read, resized to the pipeline's base size times the scale (mmseg 0.x's).

    In a process group each rank takes every world-th image and the confusion matrix is summed over the ranks,
    so every rank returns the same metrics. `workers`: processes that read and decode the next images while the
    model runs (None: `eval_workers`); the same items in the same order either way. Returns the `ConfusionMatrix`.
    """
    from .metrics import ConfusionMatrix

    if views not in TTA_VIEWS:
        raise DanetError(f"TTA views must be one of {', '.join(TTA_VIEWS)}, got {views!r}")
    original = views != "resized" and (len(scales) > 1 or flip or tuple(scales) != (1.0,))
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(rank, n, world)
    source = _AsRead(dataset) if original else dataset
    bar = tqdm(
        _items(source, indices, eval_workers(device, workers), device, labels_fit_uint8(num_classes, ignore_index)),
        total=len(indices),
        desc=desc,
        disable=not progress or rank != 0,
        leave=False,
        dynamic_ncols=True,
    )
    pipe = dataset.pipeline  # the normalisation and base size of the views of the original image
    base = tuple(pipe.base_size) if views == "base" else None
    for image, label in bar:
        if original:
            image = OriginalViews(np.asarray(image), pipe.mean, pipe.std, device, torch.float32, channels_last, base)
        else:
            image = torch.as_tensor(image)[None].to(device)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
        label = torch.as_tensor(label).to(device)
        scores = segment(
            model, image, tuple(label.shape[-2:]), mode, crop, stride, scales, flip, amp, merge, resize_logits
        )
        cm.update(scores.argmax(1)[0], label)
    cm.all_reduce()
    model.train(was_training)
    return cm


EVAL_WORKERS_MAX = 4


def eval_workers(device: torch.device, requested: int | None = None) -> int:
    """Reader processes for evaluation: as asked, else 0 on the CPU (its cores run the model: one reader process
    measured no faster) and on a GPU this process's share of the cores less one, 1 to EVAL_WORKERS_MAX (there a
    batch-1 forward takes milliseconds while decoding a Cityscapes PNG takes tens of them)."""
    if requested is not None:
        if requested < 0:
            raise DanetError(f"evaluation workers must be 0 or more, got {requested}")
        return requested
    if device.type != "cuda":
        return 0
    from .distributed import cores_per_process

    return max(1, min(EVAL_WORKERS_MAX, cores_per_process() - 1))


class _AsRead(torch.utils.data.Dataset):
    """A val dataset's items as read: RGB uint8 `(H, W, 3)` image (not resized nor normalised), uint8 label."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.read(index)


def _uint8_label(item: tuple) -> tuple:
    image, label = item
    return image, torch.as_tensor(label).to(torch.uint8)


def _items(dataset, indices: range, workers: int, device: torch.device, narrow: bool) -> Iterator:
    """The dataset's items at `indices`, in order: read here one by one, or by `workers` processes ahead of use (with
    `narrow`, their labels pass between the processes as uint8: 8x less shared memory; the metric widens them)."""
    if workers == 0:
        for i in indices:
            yield dataset[i]
        return
    from torch.utils.data import DataLoader, Subset

    from ..data import worker_init_fn

    loader = DataLoader(
        Subset(dataset, list(indices)),
        batch_size=None,  # the items as they are: one image, its label
        num_workers=workers,
        worker_init_fn=worker_init_fn,
        collate_fn=_uint8_label if narrow else None,
        pin_memory=device.type == "cuda",
    )
    yield from loader_items(loader)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


__all__ = [
    "OriginalViews",
    "autocast",
    "evaluate",
    "infer",
    "segment",
    "slide_logits",
    "slide_windows",
    "upsample_argmax",
]
