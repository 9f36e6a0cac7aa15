"""Segmentation metrics from a confusion matrix over the whole split (REFERENCE.md "Metrics").

IoU_c = TP / (TP + FP + FN); Acc_c = TP / (TP + FN) (recall); aAcc = correct / labelled pixels. A class absent
from both the labels and the predictions has IoU NaN; a class absent from the labels has Acc NaN (and IoU 0 when
it was predicted). mIoU and mAcc are means over the non-NaN classes. Everything is reported in percent.
Same numbers as mmsegmentation's IoUMetric (before its rounding to 2 decimals).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..errors import DanetError


class ConfusionMatrix:
    """Accumulates a `(K, K)` int64 confusion matrix (rows: label, columns: prediction) on the tensors' device."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions and labels, `(N, H, W)` or `(H, W)` integer tensors of the same shape.

        Pixels whose label is the ignore index (or outside 0..K-1) are skipped. Predictions must be in 0..K-1.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        k = self.num_classes
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).to(target.device).long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < k)
        # NOTE: bincount without weights is allowed under torch.use_deterministic_algorithms (integer counts)
        counts = torch.bincount(target[keep] * k + pred[keep], minlength=k * k)
        self.mat += counts[: k * k].view(k, k)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (torch.distributed, when initialised). Call once, after the last update."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def check_labelled(self, images: int, split: str, dataset) -> None:
        """DanetError when no pixel was counted: the labels of the `images` images of `split` are all ignore pixels
        (of the dataset settings `dataset`), so no metric is defined."""
        if not int(self.mat.sum()):
            what = "the label" if images == 1 else f"the {images} labels"
            zero = ", or 0 under reduce-zero-label" if dataset.reduce_zero_label else ""
            raise DanetError(
                f"{what} of split {split!r} {'has' if images == 1 else 'have'} no labelled pixel (all ignore "
                f"{dataset.ignore_index}{zero}), so mIoU is undefined; check the labels with danet data check"
            )

    def compute(self) -> dict:
        """{"mIoU", "mAcc", "aAcc": percent floats, "IoU", "Acc": per-class percent lists (NaN: see module doc)}."""
        h = self.mat.detach().double().cpu()
        tp = h.diag()
        label_area = h.sum(1)
        pred_area = h.sum(0)
        union = label_area + pred_area - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(label_area > 0, tp / label_area.clamp(min=1), torch.full_like(tp, math.nan))
        total = label_area.sum()
        return {
            "mIoU": _nanmean(iou) * 100,
            "mAcc": _nanmean(acc) * 100,
            "aAcc": float(tp.sum() / total) * 100 if total > 0 else math.nan,
            "IoU": [float(v) * 100 for v in iou],
            "Acc": [float(v) * 100 for v in acc],
        }

    def table(self, class_names) -> str:
        """A per-class table: class name, IoU and Acc in percent ("nan" where undefined); no summary line."""
        res = self.compute()
        names = [str(n) for n in class_names]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        width = max([len("Class"), *(len(n) for n in names)])
        lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
        for name, iou, acc in zip(names, res["IoU"], res["Acc"], strict=True):
            lines.append(f"{name:<{width}}  {_fmt(iou)}  {_fmt(acc)}")
        return "\n".join(lines)


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def _fmt(v: float) -> str:
    return f"{'nan':>6}" if math.isnan(v) else f"{v:6.2f}"
