"""Data order: a function of (seed, epoch); ranks split each global batch; an epoch can start at any batch."""

from __future__ import annotations

import numpy as np
import torch

from danet.engine.sampling import EpochBatchSampler, capture_rng_states, mix, restore_rng_states


def batches(sampler: EpochBatchSampler, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_two_ranks_see_the_single_process_batches():
    one = EpochBatchSampler(23, 4, seed=5)
    r0, r1 = (EpochBatchSampler(23, 4, world=2, rank=r, seed=5) for r in (0, 1))
    assert len(one) == len(r0) == 5  # drop_last
    for epoch in (0, 3):
        for full, a, b in zip(batches(one, epoch), batches(r0, epoch), batches(r1, epoch), strict=True):
            assert full == a + b


def test_epochs_differ_and_repeat():
    s = EpochBatchSampler(40, 8, seed=1)
    assert batches(s, 0) == batches(s, 0)
    assert batches(s, 0) != batches(s, 1)
    assert batches(s, 0) != batches(EpochBatchSampler(40, 8, seed=2), 0)
    indices = [i for b in batches(s, 2) for i, _ in b]
    assert sorted(indices) == sorted(set(indices))  # no repeats within an epoch


def test_start_mid_epoch_gives_the_remaining_batches():
    s = EpochBatchSampler(40, 8, seed=1, max_iters_per_epoch=4)
    full = batches(s, 2)
    assert len(full) == 4
    assert batches(s, 2, start=3) == full[3:]
    assert len(s) == 1


def test_item_seeds_are_stable_functions():
    assert mix(0, "item", 1, 2) == mix(0, "item", 1, 2) != mix(0, "item", 2, 1)
    assert 0 <= mix(123) < 2**63


def test_rng_states_round_trip_through_plain_values():
    states = capture_rng_states()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng_states(states)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
