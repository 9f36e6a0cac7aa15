"""The one Dataset class: a list of (image, label) files, a label mapping and a pipeline.

Reproducibility: the augmentation of item `index` in epoch `epoch` draws from
`numpy.random.default_rng([seed, epoch, index])`, so it does not depend on the number of DataLoader workers, on
which worker loads the item, nor on the process (rank) that loads it. Call `dataset.set_epoch(epoch)` before
iterating each epoch (the epoch lives in shared memory, so persistent workers see it too); without it every epoch
repeats the augmentation of epoch 0. A sampler that computes its own per-item seeds can instead index with
`dataset[(index, item_seed)]`: the item then draws from `default_rng(item_seed)` (the epoch is not used).
The global numpy / python / torch RNGs are never used.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import torch

from ..presets import DatasetInfo
from .io import fork_safe_opencv, label_lut, read_pair


class SegmentationDataset(torch.utils.data.Dataset):
    """Items `(image, label)`: image float32 `(3, H, W)` normalised RGB, label int64 `(H, W)` (ignore 255).

    Training (`train=True`): the random training pipeline; every item has the crop size (padded), so they batch.
    Evaluation: the image keep-ratio resized to the base size (not padded), the label at the original resolution.
    """

    def __init__(
        self,
        files: list[tuple[Path, Path]],
        info: DatasetInfo,
        pipeline,
        *,
        split: str,
        train: bool,
        seed: int = 0,
        label_palette: np.ndarray | None = None,
    ):
        self.files = list(files)
        self.info = info
        self.pipeline = pipeline
        self.split = split
        self.train = train
        self.seed = int(seed)
        self.label_palette = label_palette  # accept colour masks mapped through this (K, 3) palette (folder data)
        self._lut = label_lut(info.num_classes, info.reduce_zero_label, info.ignore_index)
        # NOTE: shared memory, so DataLoader workers (also persistent ones) see set_epoch() of the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        fork_safe_opencv()  # DataLoader workers are forked from this process

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return self.info.palette

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def ignore_index(self) -> int:
        return self.info.ignore_index

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (call before each epoch's iteration)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw item: image RGB uint8 `(H, W, 3)` and mapped label uint8 `(H, W)` (classes 0..K-1, ignore 255)."""
        image_path, label_path = self.files[index]
        return read_pair(image_path, label_path, self._lut, self.num_classes, self.label_palette)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`ds[index]`, or `ds[(index, item_seed)]` to draw the augmentation from `default_rng(item_seed)`."""
        if isinstance(key, tuple):
            index, rng = key[0], np.random.default_rng(int(key[1]))
        else:
            index, rng = key, None
        image, label = self.read(index)
        if self.train:
            return self.pipeline(image, label, rng if rng is not None else self.rng(index))
        return self.pipeline(image), torch.from_numpy(label).long()

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return f"SegmentationDataset({self.info.name}, split={self.split!r}, {len(self)} images, {mode})"


def worker_init_fn(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: OpenCV single-threaded in the worker (the workers are the parallelism).

    A no-op in a worker forked from a process that built a dataset (it already runs OpenCV with 0 threads, see
    `io.fork_safe_opencv`); it matters for spawned workers. torch already runs one thread per worker. Not needed
    for reproducibility: items seed their own generators (see the module docstring). Also: the worker's threads
    that pass tensors to the main process (multiprocessing's resource sharer) print no traceback when that process
    has gone (a SIGTERM to the process group: the command's own line is the one to read).
    """
    fork_safe_opencv()
    threading.excepthook = _quiet_when_the_main_process_is_gone
    sys.excepthook = _quiet_when_the_main_process_is_gone


def _quiet_when_the_main_process_is_gone(*args) -> None:
    """sys / threading excepthook of a loader worker: a connection the main process closed by ending (reset, broken
    pipe) is no error of the worker's; anything else is reported as Python reports it."""
    exc = args[0].exc_value if len(args) == 1 else args[1]
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return
    if len(args) == 1:
        threading.__excepthook__(*args)
    else:
        sys.__excepthook__(*args)
