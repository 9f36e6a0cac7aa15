"""Data order and augmentation randomness as pure functions of (seed, epoch, index): exact resume, any world size.

- `EpochBatchSampler`: the epoch's permutation comes from (seed, epoch); global batch i is perm[i*G:(i+1)*G] and
  rank r takes its r-th slice of B = G / world, so N processes see exactly the images one process would. An epoch
  can start at any batch (resume mid-epoch).
- Each batch entry is `(index, item_seed)` with item_seed = mix(seed, epoch, index): `SegmentationDataset` draws
  that item's crop/flip/jitter from `default_rng(item_seed)`, so augmentation does not depend on the worker count,
  the worker that loads it, the rank, or where a run resumed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def mix(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Per-rank batches of (index, item seed) for one epoch; `set_epoch(epoch, start)` picks epoch and first batch.

    Args:
        size: number of train items.
        global_batch: G, the batch over all ranks (drop_last: size // G batches per epoch).
        world, rank: process group size and this process's rank.
        seed: run seed.
        max_iters_per_epoch: optional cap on batches per epoch (short runs).
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        max_iters_per_epoch: int | None = None,
    ) -> None:
        assert global_batch % world == 0, "the global batch must split evenly over the ranks"
        self.size, self.global_batch, self.world, self.rank, self.seed = size, global_batch, world, rank, seed
        self.per_rank = global_batch // world
        full = size // global_batch
        self.iters_per_epoch = min(full, max_iters_per_epoch) if max_iters_per_epoch else full
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.iters_per_epoch - self.start

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix(self.seed, "epoch", epoch))
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        for i in range(self.start, self.iters_per_epoch):
            first = i * self.global_batch + self.rank * self.per_rank
            idx = perm[first : first + self.per_rank]
            yield [(j, mix(self.seed, "item", self.epoch, j)) for j in idx]


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
