"""A fresh run never replaces an earlier run's checkpoints by accident."""

from __future__ import annotations

import os

from danet.cli import main
from danet.data import ensure_synthetic
from test_faults_common import NARROW_MODEL_SETS

SETS = [
    "schedule.epochs=1",
    "schedule.iters_per_epoch=1",
    "schedule.batch_size=2",
    "data.crop_size=[32,32]",
    "data.num_workers=0",
    "data.val_limit=1",
    *NARROW_MODEL_SETS,
    "device=cpu",
    "progress=false",
]


def test_fresh_run_into_an_old_run_is_refused_unless_overwrite(tmp_path, capsys):
    root = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "run"
    argv = ["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(work)]
    sets = [a for s in SETS for a in ("--set", s)]
    assert main([*argv, *sets]) == 0
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    capsys.readouterr()

    assert main([*argv, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before  # nothing touched

    assert main([*argv, *sets, "--set", "overwrite=true"]) == 0


def test_fused_loss_trains_like_the_reference_loss(tmp_path):
    """`fused_loss=true` (1/8-size logits, chunked CE) logs the same losses as the full-size reference loss."""
    from danet.engine.logging import read_log

    root = ensure_synthetic(tmp_path / "data")
    logs = {}
    for fused in ("false", "true"):
        work = tmp_path / f"fused-{fused}"
        argv = ["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(work)]
        sets = [*SETS, "schedule.iters_per_epoch=3", "deterministic=true", "log_interval=1", f"fused_loss={fused}"]
        assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
        logs[fused] = [r for r in read_log(work / "log.jsonl") if r["type"] == "train"]
    assert len(logs["true"]) == len(logs["false"]) == 3
    # the first step sees the same weights and batch: equal to rounding (the gradients agree to ~3e-6 too, see
    # tests/test_speed_options.py); later steps drift apart only as float rounding through BN at batch 2 allows
    first_ref, first_fused = logs["false"][0], logs["true"][0]
    for key in ("loss", "loss_out", "loss_pam", "loss_cam", "loss_aux"):
        assert abs(first_fused[key] - first_ref[key]) <= 1e-5 * abs(first_ref[key]) + 1e-5, key
    for ref, fused in zip(logs["false"][1:], logs["true"][1:], strict=True):
        assert abs(fused["loss"] - ref["loss"]) <= 0.02 * abs(ref["loss"])


def test_a_second_run_in_a_work_dir_that_a_running_run_holds_is_refused(tmp_path, capsys):
    """Two runs started in one work dir interleaved their logs and replaced each other's checkpoints (both printed
    "done"): the running one holds the work dir's lock (here another process), so the second is refused in one line
    before it writes anything, and the holder's staged files stay; a run whose holder has ended goes ahead."""
    import subprocess
    import sys

    root = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "run"
    work.mkdir()
    staged = work / ".config.yaml.next"  # the running run's (an overwrite=true run's config until its checkpoint)
    staged.write_text("theirs")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from danet.engine.run_files import WorkDirLock; "
         "lock = WorkDirLock(); lock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()",
         str(work)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(work)]
        sets = [a for s in SETS for a in ("--set", s)]
        assert main([*argv, *sets]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"danet train: error: another danet train is running in {work} (process {holder.pid}); wait "
                       "for it to end, or pick another --work-dir")  # fmt: skip
        assert (
            sorted(p.name for p in work.iterdir()) == [".config.yaml.next", ".lock"] and staged.read_text() == "theirs"
        )
    finally:
        holder.communicate("")
    assert main([*argv, *sets]) == 0  # the holder has ended: its lock went with it


def test_a_work_dir_that_is_a_file_and_a_killed_writer_s_leftovers(tmp_path, capsys):
    """A --work-dir that is a file gets one line naming it (it named a staged file of the run's own: 'afile/.config
    .yaml.next: Not a directory'); a checkpoint's temporary file that a writer killed hard left is removed by the
    next run there, one a running writer is still writing is not."""
    import subprocess
    import sys

    root = ensure_synthetic(tmp_path / "data")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    sets = [a for s in SETS for a in ("--set", s)]
    assert main(["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(afile), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.endswith(f"the work dir {afile} is a file, not a folder; pick another --work-dir")
        and afile.read_text() == "mine"
    )

    work = tmp_path / "run"
    work.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = work / f".last.pth.tmp-{int(dead.stdout)}"
    live = work / f".epoch_1.pth.tmp-{os.getppid()}"  # a process that runs
    other = work / f".notes.txt.tmp-{int(dead.stdout)}"  # not a run's file
    for p in (leftover, live, other):
        p.write_bytes(b"partial")
    assert main(["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(work), *sets]) == 0
    assert not leftover.exists() and live.exists() and other.exists()


def test_the_lock_ends_with_its_process_not_with_its_forked_children(tmp_path, monkeypatch, capsys):
    """flock's lock was shared with the data loader's forked workers: a run killed hard left them holding it, and
    the --resume after it was refused, naming the dead process. A file system without locks (ENOSYS: Lustre
    without -o flock) refused every run as 'another danet train is running': it runs unlocked, with a note."""
    import errno
    import fcntl
    import subprocess
    import sys

    from danet.engine.run_files import WorkDirLock

    code = ("import os, sys, time; from pathlib import Path; from danet.engine.run_files import WorkDirLock; "
            "lock = WorkDirLock(); lock.acquire(Path(sys.argv[1])); child = os.fork()\n"
            "if child == 0: time.sleep(60); os._exit(0)\n"
            "print(child, flush=True); os._exit(0)")  # fmt: skip
    # (the run dies hard, without releasing; its child, as a data loader worker, lives on)
    run = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(run.stdout.readline())  # NOTE: not to the pipe's end, which the child holds open
    run.wait(timeout=60)
    try:
        assert os.path.exists(f"/proc/{child}") and (tmp_path / ".lock").exists()  # the worker, the dead run's file
        lock = WorkDirLock()
        lock.acquire(tmp_path)  # not refused
        assert lock.held and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        lock.release()
        assert not (tmp_path / ".lock").exists()
    finally:
        os.kill(child, 9)

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = WorkDirLock()
    lock.acquire(tmp_path)
    assert lock.held and "cannot be locked (Function not implemented)" in capsys.readouterr().err
    lock.release()


def test_a_lock_file_that_is_a_symbolic_link_is_replaced_not_written_through(tmp_path):
    """`.lock` linked to a file elsewhere: the run truncated that file to its pid (a symlink attack in a shared
    scratch folder, as root)."""
    from danet.engine.run_files import WorkDirLock

    (tmp_path / "important.txt").write_text("precious data")
    work = tmp_path / "run"
    work.mkdir()
    (work / ".lock").symlink_to(tmp_path / "important.txt")
    lock = WorkDirLock()
    lock.acquire(work)
    assert not (work / ".lock").is_symlink() and (work / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()
    assert (tmp_path / "important.txt").read_text() == "precious data"
