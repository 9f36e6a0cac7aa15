"""DANet loss: the two reductions against a hand computation, the four weighted parts."""

from __future__ import annotations

import math

import pytest
import torch

from danet.engine.losses import cross_entropy, danet_loss
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
