"""DANet's training loss: cross-entropy on the main, PAM and CAM outputs (weight 1) and the auxiliary head (0.4).

Two reductions, as the reference toolboxes (REFERENCE.md, Losses):
- "ssseg": mean over the labelled (non-ignored) pixels of the batch;
- "mmseg": sum over the labelled pixels divided by ALL pixels of the batch (ignored ones counted).
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


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, variant: str = "ssseg", ignore_index: int = 255):
    """Cross-entropy of `(B, K, H, W)` logits against `(B, H, W)` int64 labels -> scalar.

    NOTE: computed in float32 whatever the autocast dtype. With every pixel ignored the "ssseg" mean is 0 (not NaN).
    """
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # (B, H, W)
    return per_pixel.sum() / denominator(target, variant, ignore_index)


def danet_loss(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    variant: str = "ssseg",
    aux_weight: float = 0.4,
    ignore_index: int = 255,
) -> dict[str, torch.Tensor]:
    """The weighted sum over the model's train outputs {"out", "pam", "cam", "aux"} (each `(B, K, H, W)`).

    Returns {"loss": total, "loss_out", "loss_pam", "loss_cam", "loss_aux": unweighted parts}.
    """
    weights = dict(WEIGHTS, aux=aux_weight)
    parts = {f"loss_{k}": cross_entropy(v, target, variant, ignore_index) for k, v in outputs.items()}
    total = sum(weights[k] * parts[f"loss_{k}"] for k in outputs)
    return {"loss": total, **parts}
