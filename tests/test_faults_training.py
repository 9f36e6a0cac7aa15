"""Fault injection in training: NaN loss, a run killed at any moment, a rank that dies under torchrun.

All runs are tiny (64x64 crops, batch 2, 2 iterations per epoch, 3 epochs, 2 validation images) on a private copy of
the synthetic data, in deterministic mode on one CPU thread, so that weights can be compared bit for bit.

- NaN loss: a poisoned batch (the loss of iteration 3 made NaN) and lr=1e10 both stop the run with one line naming
  the iteration; last.pth stays the last good checkpoint (same bytes, finite weights).
- Kill: `danet train` is SIGKILLed after it wrote a checkpoint (from outside, and from inside in the middle of writing
  the next one); `danet train ... --resume` then ends with exactly the weights of an uninterrupted run.
- torchrun --max-restarts: rank 1 dies (os._exit) once at iteration 3; torchrun restarts the group, the run resumes
  from WORK_DIR/last.pth (iteration 2) and finishes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from danet.checkpoints import read_checkpoint
from danet.data import ensure_synthetic
from test_faults_common import SRC, cli_error, digest, run_cli

PRESET = "danet_tiny_synthetic"
EPOCHS, IPE = 3, 2
TOTAL = EPOCHS * IPE
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def train_argv(work: Path, data: Path, *extra: str, epochs: int = EPOCHS, batch: int = 2) -> list[str]:
    settings = {
        "schedule.epochs": epochs,
        "schedule.iters_per_epoch": IPE,
        "schedule.batch_size": batch,
        "schedule.eval_interval": 100,  # validate after the last epoch only
        "schedule.save_interval": 100,  # no epoch_N.pth: last.pth alone
        "data.crop_size": "[64,64]",
        "data.num_workers": 0,
        "data.val_limit": 2,
        "deterministic": "true",
        "progress": "false",
        "device": "cpu",
        "log_interval": 1,
    }
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    return ["train", PRESET, "--data-root", str(data), "--work-dir", str(work), *sets, *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def records(work: Path, kind: str) -> list[dict]:
    lines = (work / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> Path:
    """last.pth of an uninterrupted run (in a subprocess, one thread, like the interrupted runs)."""
    work = tmp_path_factory.mktemp("reference")
    proc = run_cli(*train_argv(work, data_root))
    assert proc.returncode == 0, proc.stderr
    assert read_checkpoint(work / "last.pth").train_state["iter"] == TOTAL
    return work / "last.pth"


# ------------------------------------------------------------------------------------------------- non-finite loss
def test_poisoned_batch_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    from danet.engine import train as train_mod

    real_loss = train_mod.danet_loss
    calls = {"n": 0}

    def poisoned_loss(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] == 3:  # the batch of iteration 3 (the first of epoch 2) is poisoned
            out["loss"] = out["loss"] * float("nan")
        return out

    saved: list[tuple[str, str]] = []
    real_save = train_mod.checkpoints.save_checkpoint

    def recording_save(path, *args, **kwargs):
        out = real_save(path, *args, **kwargs)
        saved.append((Path(path).name, digest(path)))
        return out

    monkeypatch.setattr(train_mod, "danet_loss", poisoned_loss)
    monkeypatch.setattr(train_mod.checkpoints, "save_checkpoint", recording_save)
    line = cli_error(capsys, *train_argv(tmp_path, data_root))
    assert "iteration 3" in line and "nan" in line.lower()
    assert saved == [("last.pth", saved[0][1])]  # epoch 1's last.pth, nothing after the NaN
    assert digest(tmp_path / "last.pth") == saved[0][1]
    ck = read_checkpoint(tmp_path / "last.pth")
    assert ck.train_state["iter"] == IPE
    assert all(torch.isfinite(v).all() for v in ck.state_dict.values() if v.is_floating_point())


def poison(monkeypatch, iterations: set[int]) -> None:
    """Make the loss of these iterations (1-based) NaN."""
    from danet.engine import train as train_mod

    real_loss, calls = train_mod.danet_loss, {"n": 0}

    def poisoned_loss(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] in iterations:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "danet_loss", poisoned_loss)


def test_nonfinite_skip_skips_the_step_and_finishes(data_root, tmp_path, monkeypatch):
    """nonfinite=skip: iteration 3's NaN loss changes no parameter and no optimiser state; the run finishes."""
    poison(monkeypatch, {3})
    argv = train_argv(tmp_path, data_root, "--set", "nonfinite=skip", "--set", "stop_iter=3")
    assert run_cli_inprocess(argv) == 0
    ck = read_checkpoint(tmp_path / "last.pth")
    assert ck.train_state["iter"] == 3 and records(tmp_path, "skip")[0]["iter"] == 3
    after = weights(tmp_path / "last.pth")
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    # the same run stopped before the poisoned step: every parameter and momentum buffer is unchanged by it
    before_dir = tmp_path / "before"
    assert run_cli_inprocess(train_argv(before_dir, data_root, "--set", "stop_iter=2")) == 0
    before = read_checkpoint(before_dir / "last.pth")
    params = {name for name, _ in torch.nn.Module.named_parameters(_model_of(before))}
    assert params and all(torch.equal(after[k], before.state_dict[k]) for k in params)
    mom_a, mom_b = ck.train_state["optimizer"]["state"], before.train_state["optimizer"]["state"]
    assert mom_a.keys() == mom_b.keys() and all(
        torch.equal(mom_a[i]["momentum_buffer"], mom_b[i]["momentum_buffer"]) for i in mom_a
    )
    # and a full run with one poisoned step finishes, counting it
    poison(monkeypatch, {3})
    full = tmp_path / "full"
    assert run_cli_inprocess(train_argv(full, data_root, "--set", "nonfinite=skip")) == 0
    assert [r["iter"] for r in records(full, "skip")] == [3] and records(full, "end")[0]["skipped"] == 1
    assert read_checkpoint(full / "last.pth").train_state["iter"] == TOTAL


def test_nonfinite_skip_still_stops_when_it_keeps_happening(data_root, tmp_path, monkeypatch, capsys):
    from danet.engine import train as train_mod

    monkeypatch.setattr(train_mod, "MAX_SKIPS_IN_A_ROW", 1)
    poison(monkeypatch, {3, 4})
    line = cli_error(capsys, *train_argv(tmp_path, data_root, "--set", "nonfinite=skip"))
    assert "at iteration 4, 2 times in a row" in line and "last.pth" in line
    assert [r["iter"] for r in records(tmp_path, "skip")] == [3]


def run_cli_inprocess(argv: list[str]) -> int:
    from danet.cli import main

    return main(argv)


def _model_of(ck):
    from danet.checkpoints import load_model

    return load_model(ck)


def test_huge_learning_rate_stops_with_the_iteration(data_root, tmp_path, capsys):
    line = cli_error(capsys, *train_argv(tmp_path, data_root, "--set", "schedule.lr=1.0e+10", epochs=2))
    assert "iteration" in line and ("nan" in line.lower() or "inf" in line.lower())
    last = tmp_path / "last.pth"
    if last.exists():  # whatever was saved before the loss blew up holds finite weights
        sd = weights(last)
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------------ kill -9
def test_sigkill_then_resume_matches_uninterrupted_run(data_root, reference, tmp_path):
    argv = train_argv(tmp_path, data_root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "danet.cli", *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "last.pth").exists():
            assert proc.poll() is None, f"the run ended before writing a checkpoint: {proc.stderr.read().decode()}"
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(tmp_path / "last.pth").train_state["iter"]
    assert 0 < killed_at < TOTAL
    resumed = run_cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint(tmp_path / "last.pth").train_state["iter"] == TOTAL
    assert_same_weights(tmp_path / "last.pth", reference)


KILL_WHILE_SAVING = """
import io, os, signal, sys
import torch
real_save = torch.save
count = {{"n": 0}}

def save_then_die(obj, f, *args, **kwargs):
    count["n"] += 1
    if count["n"] == {at}:  # write half of this checkpoint, then die as a power cut would
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
from danet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_while_writing_checkpoint_then_resume(data_root, reference, tmp_path):
    work = tmp_path / "work"
    script = tmp_path / "kill_while_saving.py"
    script.write_text(KILL_WHILE_SAVING.format(at=2))  # save 1: last.pth of epoch 1; save 2: epoch 2's, cut short
    argv = train_argv(work, data_root)
    proc = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ck = read_checkpoint(work / "last.pth")  # the previous checkpoint, whole
    assert ck.train_state["iter"] == IPE
    resumed = run_cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(work / "last.pth", reference)
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert len(leftovers) <= 1  # at most the killed process's temp file, never a torn last.pth


# ------------------------------------------------------------------------------------------- torchrun restarts
DIE_ONCE = """
import os, sys
from pathlib import Path
from danet.engine import train as train_mod

real_loss = train_mod.danet_loss
marker = Path(sys.argv[1])
calls = {"n": 0}

def loss_or_die(*args, **kwargs):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == int(os.environ.get("DIE_AT", "3")) and not marker.exists():
        marker.write_text(os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"))
        os._exit(17)  # rank 1 dies at iteration 3, once
    return real_loss(*args, **kwargs)

train_mod.danet_loss = loss_or_die
from danet.cli import main
sys.exit(main(sys.argv[2:]))
"""


def torchrun_dying_once(tmp_path: Path, argv: list[str], die_at: int = 3) -> subprocess.CompletedProcess:
    """`danet ARGV` under torchrun (2 CPU processes, one restart allowed) whose rank 1 dies at its loss call
    `die_at` of the first attempt; asserts that it did and that the run then finished."""
    script = tmp_path / "die_once.py"
    script.write_text(DIE_ONCE)
    marker = tmp_path / "rank1-died"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "--max-restarts=1", "--monitor-interval=0.2", str(script), str(marker), *argv,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**ENV, "DIE_AT": str(die_at)})
    except subprocess.TimeoutExpired:
        _kill_workers_of(marker)  # torchrun's workers run in sessions of their own: they outlive it
        raise
    assert marker.exists(), f"rank 1 never reached iteration {die_at}: " + proc.stderr[-2000:]
    assert marker.read_text() == "0"  # it died in the first attempt
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_restarts_dead_rank_and_resumes(data_root, tmp_path):
    work = tmp_path / "work"
    torchrun_dying_once(tmp_path, train_argv(work, data_root))
    final = read_checkpoint(work / "last.pth")
    assert final.train_state["iter"] == TOTAL
    starts = [r["iter"] for r in records(work, "start")]
    # the restarted group continued from last.pth (iteration 2) instead of starting again from 0
    assert starts[-1] == IPE, f"restart began at iteration {starts[-1]}, not from WORK_DIR/last.pth ({IPE})"
    assert all(math.isfinite(r["loss"]) for r in records(work, "train"))


def test_torchrun_restart_of_an_overwrite_run_does_not_continue_the_earlier_run(data_root, reference, tmp_path):
    """overwrite=true, a rank dying before the new run's first checkpoint: the restart starts the new run again
    (it continued the earlier run's last.pth, still there, under the new run's settings)."""
    work = tmp_path / "work"
    shutil.copytree(reference.parent, work)  # an earlier, finished run of seed 0
    torchrun_dying_once(tmp_path, train_argv(work, data_root, "--set", "overwrite=true", "--set", "seed=5"), die_at=1)
    final = read_checkpoint(work / "last.pth")
    assert final.train_state["iter"] == TOTAL and final.meta["config"]["seed"] == 5
    assert [r["iter"] for r in records(work, "start")] == [0]  # the restart began anew (its log too)


def _kill_workers_of(marker: Path) -> None:
    """SIGKILL the processes started by this test: those whose command line holds its unique marker path."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(marker).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_resume_without_checkpoint_is_one_line(data_root, tmp_path, capsys):
    last = tmp_path / "other" / "last.pth"
    line = cli_error(capsys, *train_argv(tmp_path, data_root, "--resume", str(last)))
    assert "last.pth" in line
