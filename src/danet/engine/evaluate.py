"""Inference and validation: whole-image or sliding-window logits, multi-scale + flip TTA, mIoU over a split.

Facts kept from the reference toolboxes (REFERENCE.md, Data / Metrics; mmseg's EncoderDecoder and SegTTAModel):
- whole: one forward of the keep-ratio-resized image; its output-stride logits resized bilinearly
  (align_corners=False) in one step to the ORIGINAL label size, as sssegmentation tests (resize_logits="once"); mmseg
  resizes them twice, to the input, then to the label ("twice", for mmseg's checkpoints); the metric is taken there.
- slide: windows of the crop size (engine.inference, which holds the single forward's pieces).
- TTA: sssegmentation's multi-scale + flip test: the image rescaled by each factor (bilinear on the normalised
  tensor) and flipped; each view's logits resized to the original size and averaged (its default,
  use_probs_before_resize=False). mmseg's (its tta_pipeline and SegTTAModel): each view is the ORIGINAL image (not the
  test-resized one) keep-ratio resized by the factor with OpenCV, sizes rounded as mmcv's Resize(scale_factor=r,
  keep_ratio=True) rounds them (`OriginalViews`), then normalised and flipped; the mean of the views' softmax
  probabilities at the original size (merge="probs"). mmseg 0.x's MultiScaleFlipAug (its published ms+flip figures)
  resized the original image keep-ratio to the test scale times the factor instead (`OriginalViews(base=...)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import DanetError
from ..models.danet import upsample_logits
from .inference import align_corners, infer, rescale
from .transfer import labels_fit_uint8, loader_items

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

        new_w, new_h = keep_ratio_size(*self.image.shape[:2], self._target(s))
        return new_h, new_w

    def _target(self, s: float) -> tuple[int, int]:
        """The (long, short) or (w, h) size mmcv's Resize is given for scale `s`, at least 1 x 1."""
        h, w = self.image.shape[:2]
        target = (int(self.base[0] * s), int(self.base[1] * s)) if self.base else (int(w * s + 0.5), int(h * s + 0.5))
        return max(1, target[0]), max(1, target[1])

    def view(self, s: float) -> torch.Tensor:
        from ..data.transforms import normalize, resize_keep_ratio

        image = resize_keep_ratio(self.image, None, self._target(s))[0]
        x = normalize(image, self.mean, self.std)[None].to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def is_tta(scales: Sequence[float], flip: bool) -> bool:
    """Whether these views are a multi-scale / flip test (else the one view of the image)."""
    return flip or tuple(scales) != (1.0,)


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
    tta = is_tta(scales, flip)
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
                logits = upsample_logits(logits, x.shape[-2:], corners)
            logits = upsample_logits(logits, out_size, corners)
            score = logits.softmax(dim=1) if tta and merge == "probs" else logits
            total = score if total is None else total + score
            views += 1
    return total / views if tta else total


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
    original = views != "resized" and is_tta(scales, flip)
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
    first = next(model.parameters(), None)  # NOTE: a float64 model (the equivalence checks) gets float64 images
    dtype = torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32
    for image, label in bar:
        if original:
            image = OriginalViews(np.asarray(image), pipe.mean, pipe.std, device, dtype, channels_last, base)
        else:
            image = torch.as_tensor(image)[None].to(device, dtype)
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
    "default_resize",
    "default_tta",
    "evaluate",
    "segment",
]
