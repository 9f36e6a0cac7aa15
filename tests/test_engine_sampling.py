"""Data order: a function of (seed, epoch); ranks split each global batch; an epoch can start at any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet.engine.sampling import (
    EpochBatchSampler,
    capture_rng_states,
    epoch_batches,
    mix,
    reference_replicas,
    restore_rng_states,
)


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


@pytest.mark.parametrize(("size", "batch", "replicas"), [(2975, 8, 8), (23, 16, 8), (3, 8, 8), (40, 8, 4)])
def test_padded_epochs_are_the_union_of_distributed_samplers(size, batch, replicas, monkeypatch):
    """pad_to=R: global batch i holds what R replicas of torch's DistributedSampler (drop_last=False: the order padded
    with its own first items), each batched by the DataLoader with drop_last, take as their batch i; as many batches
    as those loaders have (sssegmentation's iterations per epoch). A padding repeat draws its own augmentation."""
    from torch.utils.data import BatchSampler, DistributedSampler

    per_gpu = batch // replicas
    refs = [list(BatchSampler(DistributedSampler(range(size), replicas, r, shuffle=False), per_gpu, drop_last=True))
            for r in range(replicas)]  # fmt: skip
    monkeypatch.setattr(EpochBatchSampler, "permutation", lambda self, epoch: torch.arange(self.size))
    ours = batches(EpochBatchSampler(size, batch, seed=3, pad_to=replicas), 1)
    assert len(ours) == len(refs[0]) == epoch_batches(size, batch, replicas)
    for i, got in enumerate(ours):
        assert sorted(j for j, _ in got) == sorted(j for ref in refs for j in ref[i])
    seeds = {}
    for got in ours:
        for j, item_seed in got:
            seeds.setdefault(j, []).append(item_seed)
    assert all(len(set(s)) == len(s) for s in seeds.values())  # a repeated image is augmented anew
    assert any(len(s) > 1 for s in seeds.values()) == (len(ours) * batch > size)  # batches reach the padding
    two = [EpochBatchSampler(size, batch, world=2, rank=r, seed=3, pad_to=replicas) for r in (0, 1)]
    for full, a, b in zip(ours, batches(two[0], 1), batches(two[1], 1), strict=True):
        assert full == a + b


def test_presets_count_sssegmentation_s_iterations():
    """Its 8 GPUs' DistributedSampler pads each epoch: VOC 661 and ADE20K 1263 batches of 16 either way, Cityscapes
    2976 // 8 = 372 (371 without the padding); a schedule without loss groups is not padded."""
    from danet.presets import get_preset

    for name, ipe in (("danet_r50-d8_voc12aug", 661), ("danet_r101-d16_ade20k", 1263),
                      ("danet_r50-d8_cityscapes", 372), ("danet_tiny_synthetic", 50)):  # fmt: skip
        preset = get_preset(name)
        assert preset.iters_per_epoch == ipe, name
    assert epoch_batches(2975, 8) == 371 and reference_replicas(8, 1) == 8 and reference_replicas(2, 0) == 1
    assert reference_replicas(6, 4) == 1  # a loss group that does not divide the batch: no reference to emulate


def test_a_run_pads_its_epochs_and_resumes_only_at_their_length(tmp_path, capsys):
    """A run whose loss groups emulate 2 GPUs pads 5 images to 6 (3 batches of 2, not 2) and records that length in
    its state; a state without it (written before the padding) resumes only with its own length, which the refusal
    names; nothing of the run is touched by the refusal."""
    from danet.checkpoints import read_checkpoint
    from danet.cli import main
    from danet.data import ensure_synthetic
    from danet.engine.logging import read_log
    from test_faults_common import NARROW_MODEL_SETS

    sets = ["schedule.epochs=1", "schedule.batch_size=2", "schedule.loss_images=1", "data.train_limit=5",
            "data.crop_size=[32,32]", "data.num_workers=0", "data.val_limit=1", *NARROW_MODEL_SETS, "device=cpu",
            "progress=false"]  # fmt: skip
    work = tmp_path / "run"
    argv = ["train", "danet_tiny_synthetic", "--data-root", str(ensure_synthetic(tmp_path / "data"))]
    assert main([*argv, "--work-dir", str(work), *[a for s in sets for a in ("--set", s)]]) == 0
    start = next(r for r in read_log(work / "log.jsonl") if r["type"] == "start")
    state = read_checkpoint(work / "last.pth").train_state
    assert start["iters_per_epoch"] == state["iters_per_epoch"] == 3 and state["iter"] == 3
    raw = torch.load(work / "last.pth", weights_only=True)
    del raw["train_state"]["iters_per_epoch"]  # as the versions before the padding wrote it
    torch.save(raw, work / "last.pth")
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    capsys.readouterr()
    resume = ["train", str(work / "config.yaml"), "--resume", "--set", "schedule.epochs=2"]
    assert main(resume) == 2
    err = capsys.readouterr().err.strip()
    assert "trained with epochs of 2 iterations, this run's are 3" in err and len(err.splitlines()) == 1
    assert "--set schedule.iters_per_epoch=2" in err
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    raw["train_state"]["iters_per_epoch"] = 5  # longer than this run's: no cap lengthens them
    torch.save(raw, work / "last.pth")
    assert main(resume) == 2
    assert "resume with the run's own data and schedule settings" in capsys.readouterr().err
    del raw["train_state"]["iters_per_epoch"]
    torch.save(raw, work / "last.pth")
    assert main([*resume, "--set", "schedule.iters_per_epoch=2"]) == 0
    assert read_checkpoint(work / "last.pth").train_state["iter"] == 4  # epoch 2 from its second batch
