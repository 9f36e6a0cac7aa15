"""SGD and the poly learning-rate policy of sssegmentation's PolyScheduler (REFERENCE.md, Optimisation).

lr(i) = (1 - i / max_iters) ** power * (base_lr - min_lr) + min_lr, set before iteration i (0-based), so the first
step runs at base_lr and the last at just above min_lr. One parameter group, no warm-up, as the DANet configs.
"""

from __future__ import annotations

import torch
from torch import nn


def final_lr(lr: float, min_lr: float | None) -> float:
    """Where the poly decay ends: `min_lr`, or when unset lr / 100, as sssegmentation's scheduler (its DANet configs set
    none), so that a run with another lr ends at its own hundredth."""
    return min_lr if min_lr is not None else lr * 0.01


def poly_lr(it: int, max_iters: int, base_lr: float, min_lr: float = 1e-4, power: float = 0.9) -> float:
    """The learning rate of iteration `it` (0-based); `min_lr` from `max_iters` on."""
    frac = min(it, max_iters) / max(max_iters, 1)
    return (1.0 - frac) ** power * (base_lr - min_lr) + min_lr


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over every parameter in one group (sssegmentation's DANet configs set no per-parameter rules)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


class PolyLR:
    """Sets the poly learning rate on the optimizer each iteration; `state_dict` holds the iteration counter.

    Usage per iteration: `lr = sched.step()` before `optimizer.step()` (sets the lr of the current iteration and
    advances the counter).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lr: float, max_iters: int, power: float = 0.9, min_lr: float = 1e-4
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        self.cur_iter = 0

    def lr_at(self, it: int) -> float:
        return poly_lr(it, self.max_iters, self.base_lr, self.min_lr, self.power)

    def step(self) -> float:
        lr = self.lr_at(self.cur_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("lr_mult", 1.0) * lr
        self.cur_iter += 1
        return lr

    def state_dict(self) -> dict:
        return {
            "cur_iter": self.cur_iter,
            "base_lr": self.base_lr,
            "max_iters": self.max_iters,
            "power": self.power,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        self.cur_iter = int(state["cur_iter"])
