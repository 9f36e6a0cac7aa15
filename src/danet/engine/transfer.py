"""Getting training batches onto the device: narrow labels through the loader, and (CUDA) copies off the compute stream.

- `narrow_labels_collate`: the loader's workers hand labels over as uint8 instead of int64 when every value fits
  (class indices and the ignore index all in 0..255; the datasets check every label): 2 MB instead of 17 MB per
  512x512 batch of 8 to pin and to copy. The device widens them back (one small kernel); the values are the same.
- `to_device`: yields each `(images, labels)` on the device, labels int64, images channels_last if asked. On CUDA
  with `prefetch`, batch i+1 is copied on a side stream while step i computes; without it, the copies (~42 MB per
  batch of 8 at 512x512 before narrowing) run on the compute stream between two steps, where the GPU waits for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, default_collate

from ..errors import DanetError


def loader_items(loader: DataLoader) -> Iterator:
    """Iterate a DataLoader; a DanetError raised in a worker process comes out as its own one-line message.

    NOTE: DataLoader re-raises worker exceptions with "Caught ... in DataLoader worker" and the worker's traceback
    prepended to the message; the user should see only the original line.
    """
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DanetError as e:
            msg = str(e)
            if "DataLoader worker" in msg:
                lines = [ln for ln in msg.splitlines() if ln.strip()]
                msg = lines[-1].split("DanetError: ", 1)[-1] if lines else msg
                raise DanetError(msg) from None
            raise
        yield item


def labels_fit_uint8(num_classes: int, ignore_index: int) -> bool:
    """Whether every valid label value (0..num_classes-1 and ignore_index) fits in uint8."""
    return num_classes <= 256 and 0 <= ignore_index <= 255


def narrow_labels_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """`default_collate`, then labels as uint8 (use only when `labels_fit_uint8`)."""
    images, labels = default_collate(batch)
    return images, labels.to(torch.uint8)


class SideStream:
    """Runs the copies of one batch on a CUDA side stream; the compute stream waits for exactly that batch."""

    def __init__(self, device: torch.device) -> None:
        self.main = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def start(self, fn, *args):
        with torch.cuda.stream(self.side):
            out = fn(*args)
            done = torch.cuda.Event()
            done.record(self.side)
        return out, done

    def finish(self, pending):
        out, done = pending
        # NOTE: wait for this batch's event, not the side stream's tail: the next batch's copy is already queued
        # behind it
        self.main.wait_event(done)
        for t in out:  # made on the side stream, used and freed on the main one: the allocator must know
            t.record_stream(self.main)
        return out


def to_device(
    batches: Iterable, device: torch.device, channels_last: bool, prefetch: bool, streams=None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(images, labels)` on `device`; see the module docstring. `streams` replaces `SideStream(device)` (tests)."""

    def move(images: torch.Tensor, labels: torch.Tensor):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device, non_blocking=True).long()

    if streams is None:
        if not (prefetch and device.type == "cuda"):
            for images, labels in batches:
                yield move(images, labels)
            return
        streams = SideStream(device)
    pending = None
    for images, labels in batches:
        nxt = streams.start(move, images, labels)  # queued before step i runs, so it overlaps it
        if pending is not None:
            yield streams.finish(pending)
        pending = nxt
    if pending is not None:
        yield streams.finish(pending)
