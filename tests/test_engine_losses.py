"""DANet loss: the two reductions against a hand computation, the four weighted parts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from danet.engine.fused_loss import fused_danet_loss
from danet.engine.losses import cross_entropy, danet_loss, groups
from danet.errors import DanetError


def hand_ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, int, int]:
    """Sum of -log softmax at the labelled pixels (plain Python loops), labelled count, all pixels."""
    total, labelled = 0.0, 0
    b, k, h, w = logits.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[n, y, x])
                if t == 255:
                    continue
                z = [float(logits[n, c, y, x]) for c in range(k)]
                m = max(z)
                total += -(z[t] - m - math.log(sum(math.exp(v - m) for v in z)))
                labelled += 1
    return total, labelled, b * h * w


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 3
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0, :3] = 255
    target[1, 2, :] = 255
    return logits, target


def test_ssseg_mean_over_labelled_pixels(batch):
    logits, target = batch
    total, labelled, _ = hand_ce(logits, target)
    assert cross_entropy(logits, target, "ssseg").item() == pytest.approx(total / labelled, rel=1e-5)


def test_mmseg_sum_over_all_pixels(batch):
    logits, target = batch
    total, _, pixels = hand_ce(logits, target)
    assert cross_entropy(logits, target, "mmseg").item() == pytest.approx(total / pixels, rel=1e-5)


def test_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.full((1, 2, 2), 255)
    assert cross_entropy(logits, target, "ssseg").item() == 0.0
    assert cross_entropy(logits, target, "mmseg").item() == 0.0


def test_weighted_sum_of_four_outputs(batch):
    logits, target = batch
    outs = {"out": logits, "pam": logits * 0.5, "cam": logits * 2, "aux": -logits}
    parts = danet_loss(outs, target, "ssseg")
    expect = {k: hand_ce(v, target) for k, v in outs.items()}
    expect = {k: t / n for k, (t, n, _) in expect.items()}
    for k in outs:
        assert parts[f"loss_{k}"].item() == pytest.approx(expect[k], rel=1e-5)
    total = expect["out"] + expect["pam"] + expect["cam"] + 0.4 * expect["aux"]
    assert parts["loss"].item() == pytest.approx(total, rel=1e-5)


def test_unknown_variant():
    with pytest.raises(DanetError, match="ssseg"):
        cross_entropy(torch.randn(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), "focal")


# ------------------------------------------------------------------------------------------ loss over image groups
@pytest.fixture
def four():
    """Four images whose labelled pixel counts differ a lot (image 1 is mostly padding, as a small rescaled crop)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 8, 8, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 5, (4, 8, 8), generator=g)
    target[1, :, 2:] = 255
    target[2, :2] = 255
    return logits, target


@pytest.mark.parametrize("variant", ["ssseg", "mmseg"])
def test_loss_over_groups_is_the_mean_of_each_gpus_loss(four, variant):
    """schedule.loss_images=2: what sssegmentation's 8 GPUs of 2 images compute, each its own mean over its labelled
    pixels (F.cross_entropy's mean), averaged as DDP averages their gradients."""
    logits, target = four
    per_gpu = [F.cross_entropy(logits[i : i + 2], target[i : i + 2], ignore_index=255, reduction="sum")
               / ((target[i : i + 2] != 255).sum() if variant == "ssseg" else target[i : i + 2].numel())
               for i in (0, 2)]  # fmt: skip
    want = sum(per_gpu) / 2
    got = cross_entropy(logits, target, variant, images=2)
    assert abs(got.item() - want.item()) < 1e-6
    whole = cross_entropy(logits, target, variant)  # one group: the batch's own reduction
    if variant == "ssseg":  # the mostly ignored image weighs more in its own group
        assert abs(whole.item() - got.item()) > 1e-3
    else:  # every image has the same number of pixels: groups change nothing
        assert abs(whole.item() - got.item()) < 1e-6
    assert torch.equal(cross_entropy(logits, target, variant, images=4), whole)


@pytest.mark.parametrize("images", [0, 1, 2])
def test_fused_loss_over_groups_equals_the_upsampled_one(four, images):
    """The fused loss (from the 1/8-size logits) reduces over the same groups, value and gradients."""
    logits, target = four
    small = {k: logits[:, :, ::4, ::4].clone().requires_grad_() for k in ("out", "pam", "cam", "aux")}
    up = {k: F.interpolate(v, size=(8, 8), mode="bilinear", align_corners=False) for k, v in small.items()}
    ref = danet_loss(up, target, images=images)
    fused = fused_danet_loss(small, target, images=images)
    assert abs(fused["loss"].item() - ref["loss"].item()) < 1e-5
    g_ref = torch.autograd.grad(ref["loss"], list(small.values()))
    g_fused = torch.autograd.grad(fused["loss"], list(small.values()))
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(g_fused, g_ref, strict=True))


def test_loss_groups_must_split_the_batch():
    assert groups(16, 2) == [slice(i, i + 2) for i in range(0, 16, 2)]
    assert groups(8, 0) == [slice(0, 8)] and groups(2, 4) == [slice(0, 2)]
    with pytest.raises(DanetError, match="batch of 6 images per process does not split into loss groups of "
                       "schedule.loss_images=4"):  # fmt: skip
        groups(6, 4)
