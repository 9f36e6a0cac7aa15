"""Data order and augmentation randomness as pure functions of (seed, epoch, index): exact resume, any world size.

- `EpochBatchSampler`: the epoch's permutation comes from (seed, epoch); global batch i is perm[i*G:(i+1)*G] and
  rank r takes its r-th slice of B = G / world, so N processes see exactly the images one process would. An epoch
  can start at any batch (resume mid-epoch). With `pad_to` R the permutation is first padded with its own first
  items to a multiple of R, as torch's DistributedSampler pads it over R replicas (sssegmentation's 8 GPUs): global
  batch i is then the union of what those R replicas' loaders (drop_last) take as their batch i.
- Each batch entry is `(index, item_seed)` with item_seed = mix(seed, epoch, index): `SegmentationDataset` draws
  that item's crop/flip/jitter from `default_rng(item_seed)`, so augmentation does not depend on the worker count,
  the worker that loads it, the rank, or where a run resumed.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def mix(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def padded_size(size: int, replicas: int = 1) -> int:
    """Items of an epoch of `size` items padded over `replicas` (DistributedSampler, drop_last=False):
    replicas * ceil(size / replicas)."""
    return replicas * math.ceil(size / replicas) if size else 0


def reference_replicas(global_batch: int, loss_images: int) -> int:
    """The GPUs of the reference run a schedule emulates: the global batch over its images per loss reduction
    (`schedule.loss_images`, each reference GPU's batch: 16 / 2 = 8); 1 where that is 0 (no reference) or does not
    divide the batch."""
    return global_batch // loss_images if loss_images and global_batch % loss_images == 0 else 1


def epoch_batches(size: int, global_batch: int, replicas: int = 1) -> int:
    """Full global batches an epoch of `size` items padded over `replicas` holds (drop_last): sssegmentation's
    iterations per epoch on `replicas` GPUs, e.g. Cityscapes' 2975 images over 8: 2976 // 8 = 372."""
    return padded_size(size, replicas) // global_batch


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Per-rank batches of (index, item seed) for one epoch; `set_epoch(epoch, start)` picks epoch and first batch.

    Args:
        size: number of train items.
        global_batch: G, the batch over all ranks (drop_last: size // G batches per epoch).
        world, rank: process group size and this process's rank.
        seed: run seed.
        max_iters_per_epoch: optional cap on batches per epoch (short runs).
        pad_to: R, pad each epoch's permutation with its own first items to a multiple of R (1: no padding).
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        max_iters_per_epoch: int | None = None,
        pad_to: int = 1,
    ) -> None:
        assert global_batch % world == 0, "the global batch must split evenly over the ranks"
        assert pad_to >= 1, "pad_to counts replicas: 1 or more"
        self.size, self.global_batch, self.world, self.rank, self.seed = size, global_batch, world, rank, seed
        self.per_rank = global_batch // world
        self.pad_to = pad_to
        full = epoch_batches(size, global_batch, pad_to)
        self.iters_per_epoch = min(full, max_iters_per_epoch) if max_iters_per_epoch else full
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.iters_per_epoch - self.start

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix(self.seed, "epoch", epoch))
        return torch.randperm(self.size, generator=g)

    def order(self, epoch: int) -> list[int]:
        """The epoch's items: its permutation, padded with its own first items (repeated if need be) to
        `padded_size(size, pad_to)`."""
        perm = self.permutation(epoch).tolist()
        pad = padded_size(self.size, self.pad_to) - self.size
        return perm + (perm * math.ceil(pad / self.size))[:pad] if pad else perm

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        for i in range(self.start, self.iters_per_epoch):
            first = i * self.global_batch + self.rank * self.per_rank
            yield [(order[p], self.item_seed(p, order[p])) for p in range(first, first + self.per_rank)]

    def item_seed(self, position: int, index: int) -> int:
        """The augmentation seed of item `index` at `position` of this epoch's order: a function of (seed, epoch,
        index); a padding repeat (position >= size) draws its own, as the replica that takes it would."""
        if position < self.size:
            return mix(self.seed, "item", self.epoch, index)
        return mix(self.seed, "padding", self.epoch, position)


def capture_rng_states() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain values (loadable with weights_only=True)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng_states(state: dict) -> None:
    """Inverse of `capture_rng_states` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
