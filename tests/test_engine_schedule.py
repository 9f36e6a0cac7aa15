"""Poly learning rate (sssegmentation's PolyScheduler): values at a few iterations, as set on the optimizer."""

from __future__ import annotations

import pytest
import torch

from danet.engine.schedule import PolyLR, build_optimizer, poly_lr


@pytest.mark.parametrize(
    "it, expected",
    [
        (0, 0.01),
        (1, (1 - 1 / 1000) ** 0.9 * (0.01 - 1e-4) + 1e-4),
        (500, 0.5**0.9 * 0.0099 + 1e-4),  # 0.0054053...
        (999, (1 / 1000) ** 0.9 * 0.0099 + 1e-4),
        (1000, 1e-4),
        (2000, 1e-4),  # past the end: the floor
    ],
)
def test_poly_formula(it, expected):
    assert poly_lr(it, 1000, 0.01, 1e-4, 0.9) == pytest.approx(expected, rel=1e-12)


def test_half_way_value_by_hand():
    assert poly_lr(500, 1000, 0.01) == pytest.approx(0.0054053, abs=1e-7)


def test_scheduler_sets_the_optimizer_and_resumes():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 0.01, 0.9, 5e-4)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    assert len(opt.param_groups) == 1
    sched = PolyLR(opt, 0.01, 10)
    seen = [sched.step() for _ in range(4)]
    assert seen == [poly_lr(i, 10, 0.01) for i in range(4)]
    assert opt.param_groups[0]["lr"] == seen[-1]
    other = PolyLR(build_optimizer(model, 0.01, 0.9, 5e-4), 0.01, 10)
    other.load_state_dict(sched.state_dict())
    assert other.step() == sched.step() == poly_lr(4, 10, 0.01)
