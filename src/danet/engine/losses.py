"""DANet's training loss: cross-entropy on the main, PAM and CAM outputs (weight 1) and the auxiliary head (0.4).

Two reductions, as the reference toolboxes (REFERENCE.md, Losses):
- "ssseg": mean over the labelled (non-ignored) pixels of the batch;
- "mmseg": sum over the labelled pixels divided by ALL pixels of the batch (ignored ones counted).

`images` (`schedule.loss_images`) takes that reduction over groups of that many images and averages the groups:
the toolboxes reduce over each GPU's batch (sssegmentation's zoo: 2 images, Cityscapes 1) and DDP averages the 8
GPUs' gradients, so a crop with few labelled pixels (mostly padding) weighs as much as its GPU's other image
whatever the number of processes here. 0: one group, the process's whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DanetError

WEIGHTS = {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}


def denominator(target: torch.Tensor, variant: str = "ssseg", ignore_index: int = 255) -> torch.Tensor | int:
    """What the summed per-pixel loss is divided by: labelled pixels ("ssseg", at least 1) or all pixels ("mmseg")."""
    if variant == "ssseg":
        return (target != ignore_index).sum().clamp_min(1)
    if variant == "mmseg":
        return target.numel()
    raise DanetError(f"unknown loss variant {variant!r}; use 'ssseg' or 'mmseg'")


def groups(batch: int, images: int) -> list[slice]:
    """The images of a batch of `batch` whose loss is reduced together: groups of `images` (0: the whole batch)."""
    if not images or images >= batch:
        return [slice(0, batch)]
    if batch % images:
        raise DanetError(
            f"a batch of {batch} images per process does not split into loss groups of schedule.loss_images="
            f"{images}; make the batch per process a multiple of it, or set schedule.loss_images=0 (one group)"
        )
    return [slice(i, i + images) for i in range(0, batch, images)]


def grouped_mean(summed, target: torch.Tensor, variant: str, ignore_index: int, images: int) -> torch.Tensor:
    """The mean over `groups` of each group's reduction: `summed(g)` (the summed per-pixel loss of the images `g`)
    over its `denominator`. One group is the batch's own reduction, exactly."""
    gs = groups(target.shape[0], images)
    total = sum(summed(g) / denominator(target[g], variant, ignore_index) for g in gs)
    return total / len(gs) if len(gs) > 1 else total


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, variant: str = "ssseg", ignore_index: int = 255, images: int = 0
):
    """Cross-entropy of `(B, K, H, W)` logits against `(B, H, W)` int64 labels -> scalar (reduced over groups of
    `images` images, see the module's note).

    NOTE: computed in float32 whatever the autocast dtype. With every pixel ignored the "ssseg" mean is 0 (not NaN).
    """
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # (B, H, W)
    return grouped_mean(lambda g: per_pixel[g].sum(), target, variant, ignore_index, images)


def danet_loss(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    variant: str = "ssseg",
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    images: int = 0,
) -> dict[str, torch.Tensor]:
    """The weighted sum over the model's train outputs {"out", "pam", "cam", "aux"} (each `(B, K, H, W)`), each
    reduced over groups of `images` images (0: the whole batch).

    Returns {"loss": total, "loss_out", "loss_pam", "loss_cam", "loss_aux": unweighted parts}.
    """
    weights = dict(WEIGHTS, aux=aux_weight)
    parts = {f"loss_{k}": cross_entropy(v, target, variant, ignore_index, images) for k, v in outputs.items()}
    total = sum(weights[k] * parts[f"loss_{k}"] for k in outputs)
    return {"loss": total, **parts}
