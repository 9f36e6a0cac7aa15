"""Batches to the device: uint8 labels through the loader, widened on the device; the CUDA prefetch order."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import default_collate

import danet.engine.train as T
from danet.config import RunConfig, apply_overrides, to_dict
from danet.data import ensure_synthetic
from danet.engine.start import check_compatible
from danet.engine.transfer import labels_fit_uint8, narrow_labels_collate, to_device
from test_faults_common import NARROW_MODEL_SETS

CPU = torch.device("cpu")


def items(n: int, h: int = 5, w: int = 7, classes: int = 150) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    out = []
    for _ in range(n):
        lab = torch.randint(0, classes, (h, w), generator=g)
        lab[0, :3] = 255
        out.append((torch.randn(3, h, w, generator=g), lab))
    return out


@pytest.mark.parametrize(
    "classes, ignore, fits",
    [(150, 255, True), (19, 255, True), (256, 255, True), (257, 255, False), (21, -1, False), (21, 256, False)],
)
def test_labels_fit_uint8(classes, ignore, fits):
    assert labels_fit_uint8(classes, ignore) is fits


def test_narrow_collate_keeps_every_value():
    batch = items(3)
    images, labels = narrow_labels_collate(batch)
    ref_images, ref_labels = default_collate(batch)
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), ref_labels)
    assert torch.equal(images, ref_images)


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_device_widens_labels_and_sets_the_layout(channels_last):
    batches = [narrow_labels_collate(items(2)) for _ in range(3)]
    out = list(to_device(iter(batches), CPU, channels_last, prefetch=True))  # prefetch: CUDA only, no-op here
    assert len(out) == 3
    for (img, lab), (ref_img, ref_lab) in zip(out, batches, strict=True):
        assert lab.dtype == torch.int64 and torch.equal(lab, ref_lab.long())
        assert torch.equal(img, ref_img)
        assert img.is_contiguous(memory_format=torch.channels_last) is channels_last


class FakeStreams:
    """Stands in for the CUDA side stream: records when each batch's copy starts and when the step waits for it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.n = 0

    def start(self, fn, *args):
        i, self.n = self.n, self.n + 1
        self.log.append(("start", i))
        return fn(*args), i  # the "event" is the batch's own number

    def finish(self, pending):
        out, i = pending
        self.log.append(("wait", i))
        return out


@pytest.mark.parametrize("n", [0, 1, 4])
def test_prefetch_copies_the_next_batch_before_the_step_and_waits_for_its_own(n):
    batches = [narrow_labels_collate(items(2)) for _ in range(n)]
    fake = FakeStreams()
    got = []
    for img, lab in to_device(iter(batches), CPU, False, prefetch=True, streams=fake):
        got.append((img, lab))
        fake.log.append(("step", len(got) - 1))
    assert [torch.equal(g[1], b[1].long()) for g, b in zip(got, batches, strict=True)] == [True] * n
    want = [("start", 0)] if n else []
    for i in range(n):  # batch i+1's copy is queued before step i, and step i waits only for batch i's event
        want += ([("start", i + 1)] if i + 1 < n else []) + [("wait", i), ("step", i)]
    assert fake.log == want


def test_narrow_labels_change_nothing_in_training(tmp_path, monkeypatch):
    """Two steps with uint8 labels through the loader and with int64 labels give the same weights, bit for bit."""
    root = ensure_synthetic(tmp_path / "data")
    sets = ["schedule.epochs=1", "schedule.iters_per_epoch=2", "schedule.batch_size=2", "data.crop_size=[32,32]",
            "data.num_workers=0", "data.val_limit=1", *NARROW_MODEL_SETS, "deterministic=true", "device=cpu",
            "progress=false"]  # fmt: skip
    seen: list[torch.dtype] = []
    orig = T._batches

    def spy(loader):
        for images, labels in orig(loader):
            seen.append(labels.dtype)
            yield images, labels

    monkeypatch.setattr(T, "_batches", spy)
    states = []
    for narrow in (True, False):
        monkeypatch.setattr(T, "labels_fit_uint8", lambda k, ignore, narrow=narrow: narrow)
        work = tmp_path / f"narrow_{narrow}"
        T.train(
            apply_overrides(RunConfig(preset="danet_tiny_synthetic", data_root=str(root), work_dir=str(work)), sets)
        )
        states.append(torch.load(work / "last.pth", weights_only=True)["model"])
        assert "num_workers: 0" in (work / "config.yaml").read_text()
    assert seen == [torch.uint8] * 2 + [torch.int64] * 2
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize(
    "requested, device, cores, local_world, want",
    [
        (0, "cuda", 16, 1, 0),  # asked for: kept
        (5, "cpu", 2, 1, 5),
        (None, "cpu", 64, 1, 2),  # the CPU also computes
        (None, "cuda", 16, 1, 8),  # one GPU on 16 cores: capped at 8
        (None, "cuda", 64, 8, 7),  # 8 processes share 64 cores: 8 each, one left for the step's own process
        (None, "cuda", 4, 4, 2),  # at least 2
    ],
)
def test_loader_workers(monkeypatch, requested, device, cores, local_world, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert T.loader_workers(requested, torch.device(device)) == want


def test_prefetch_and_workers_do_not_count_as_changed_settings_on_resume():
    base = RunConfig(preset="danet_tiny_synthetic").resolve()
    other = apply_overrides(RunConfig(preset="danet_tiny_synthetic"), ["data.prefetch=false", "data.num_workers=7"])
    assert check_compatible(to_dict(base), other.resolve()) == []
    crop = apply_overrides(RunConfig(preset="danet_tiny_synthetic"), ["data.crop_size=[32,32]"])
    assert check_compatible(to_dict(base), crop.resolve()) == ["data"]
