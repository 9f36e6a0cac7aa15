"""Two CPU processes (gloo) train one run: the same metrics on every rank, checkpoints and logs from rank 0 only."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from danet.checkpoints import read_checkpoint
from danet.config import RunConfig, apply_overrides, from_dict, to_dict
from danet.data import ensure_synthetic
from danet.engine.logging import jsonable, read_log
from test_faults_common import NARROW_MODEL_SETS

SETS = [
    "schedule.epochs=1",
    "schedule.iters_per_epoch=2",
    "schedule.batch_size=4",  # global: 2 per rank
    "data.crop_size=[32,32]",
    "data.num_workers=0",
    "data.val_limit=3",  # uneven over 2 ranks: 2 + 1 images
    *NARROW_MODEL_SETS,
    "device=cpu",
    "threads=1",
    "progress=false",
    "log_interval=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out: str, poisoned_rank: int = -1) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import danet.engine.train as T
    from danet.engine.train import train

    if rank == poisoned_rank:  # this rank's first loss is NaN
        real, calls = T.danet_loss, []

        def poisoned(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 1:
                out["loss"] = out["loss"] * float("nan")
            return out

        T.danet_loss = poisoned

    summary = train(from_dict(cfg))
    Path(out, f"rank{rank}.json").write_text(json.dumps(jsonable(summary)))


def _recording_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """`_worker`, writing the loss each training step of this rank computed to `out/losses{rank}.json`."""
    import danet.engine.train as T

    real, seen = T.danet_loss, []

    def recording(*args, **kwargs):
        losses = real(*args, **kwargs)
        seen.append(losses["loss"].item())
        return losses

    T.danet_loss = recording
    _worker(rank, world, port, cfg, out)
    Path(out, f"losses{rank}.json").write_text(json.dumps(seen))


def spawn_two(*args, timeout: float = 180, worker=None) -> None:
    """Run `worker(rank, 2, port, *args)` (default `_worker`) on 2 ranks; a deadlock (one rank waiting in an
    all-reduce the other never joins) fails the test after `timeout` seconds instead of hanging the suite."""
    ctx = mp.spawn(worker or _worker, args=(2, _free_port(), *args), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2 ranks did not finish in {timeout:.0f} s (deadlocked?)")


def test_two_gloo_ranks_report_identical_metrics(tmp_path):
    data = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "work"
    cfg = apply_overrides(RunConfig(preset="danet_tiny_synthetic", data_root=str(data), work_dir=str(work)), SETS)
    spawn_two(to_dict(cfg), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["iter"] == r1["iter"] == 2
    assert r0["metrics"] == r1["metrics"]
    assert 0 <= r0["metrics"]["mIoU"] <= 100 and len(r0["metrics"]["IoU"]) == 5
    saved = json.loads((work / "metrics.json").read_text())
    assert saved["mIoU"] == r0["metrics"]["mIoU"]
    starts = [r for r in read_log(work / "log.jsonl") if r["type"] == "start"]
    assert len(starts) == 1 and starts[0]["world"] == 2  # one writer
    ck = read_checkpoint(work / "last.pth")
    assert ck.train_state["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ck.state_dict.values() if v.is_floating_point())


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """nonfinite=skip: rank 1 alone sees a NaN loss; both ranks skip that step (a rank stepping alone would leave
    the other waiting in DDP's all-reduce) and finish with the same weights and metrics."""
    data = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "work"
    cfg = apply_overrides(
        RunConfig(preset="danet_tiny_synthetic", data_root=str(data), work_dir=str(work)), [*SETS, "nonfinite=skip"]
    )
    spawn_two(to_dict(cfg), str(tmp_path), 1)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1 and r0["iter"] == r1["iter"] == 2
    assert r0["metrics"] == r1["metrics"]
    assert [r["iter"] for r in read_log(work / "log.jsonl") if r["type"] == "skip"] == [1]


# ------------------------------------------------------------------------------ torchrun's variables, set by hand
def test_variables_no_torchrun_made_are_ignored_or_refused(monkeypatch):
    from danet.engine.distributed import env_ranks
    from danet.errors import DanetError

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")  # left in the shell: one process, which must do the writing
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_ranks() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DanetError, match="WORLD_SIZE=2 asks for 2 processes, but MASTER_ADDR and MASTER_PORT are not"):
        env_ranks()  # (RANK is set)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(DanetError, match="but MASTER_PORT is not set: start them with torchrun"):
        env_ranks()
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DanetError, match="RANK=2 is outside 0 .. WORLD_SIZE - 1 = 1"):
        env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DanetError, match="WORLD_SIZE='two' is not a number"):
        env_ranks()


def test_a_stray_rank_still_writes_the_run(tmp_path, monkeypatch):
    """RANK=1 without torchrun: the run trains and writes its files (it wrote nothing and exited 0)."""
    from danet.cli import main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = ensure_synthetic(tmp_path / "data")
    sets = [a for s in [*SETS, "stop_iter=1"] for a in ("--set", s)]
    assert (
        main(["train", "danet_tiny_synthetic", "--data-root", str(data), "--work-dir", str(tmp_path / "w"), *sets]) == 0
    )
    assert (tmp_path / "w" / "last.pth").is_file()


def test_the_logged_loss_is_the_whole_batchs(tmp_path):
    """log.jsonl's loss is the mean of the ranks' losses (rank 0's half batch alone was logged)."""
    data = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "work"
    cfg = apply_overrides(RunConfig(preset="danet_tiny_synthetic", data_root=str(data), work_dir=str(work)), SETS)
    spawn_two(to_dict(cfg), str(tmp_path), worker=_recording_worker)
    l0, l1 = (json.loads((tmp_path / f"losses{r}.json").read_text()) for r in (0, 1))
    logged = [r["loss"] for r in read_log(work / "log.jsonl") if r["type"] == "train"]
    assert len(logged) == len(l0) == len(l1) == 2 and l0 != l1
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(l0, l1, strict=True)], abs=1e-5)
