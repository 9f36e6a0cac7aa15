"""Fault injection: the disk fills up (or a write fails) while a checkpoint is being saved.

Each case first saves a good checkpoint, then fails the next save of the same file midway. The previous file must
keep its exact bytes, no temporary file may be left behind, and the error must be one DanetError line.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from danet import checkpoints
from danet.checkpoints import read_checkpoint, save_checkpoint
from danet.errors import DanetError
from test_faults_common import SRC, digest, tiny_model

PRESET = "danet_tiny_synthetic"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def saved(tmp_path):
    """(path, digest) of a good checkpoint already on disk, and a different model to save over it."""
    path = tmp_path / "last.pth"
    save_checkpoint(path, tiny_model(), PRESET, train_state={"iter": 10})
    newer = tiny_model()
    with torch.no_grad():
        newer.head.cls.conv.bias.fill_(1.0)
    return path, digest(path), newer


def _assert_intact(path, before) -> None:
    assert digest(path) == before
    assert read_checkpoint(path).train_state == {"iter": 10}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_enospc_midway_through_torch_save(saved, monkeypatch):
    path, before, newer = saved
    real_save = torch.save
    calls = []

    def save_half_then_fail(obj, f, *args, **kwargs):
        calls.append(f)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
        else:
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
        raise ENOSPC

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(DanetError, match="space|No space") as e:
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    assert calls, "torch.save was not used: the fault was not injected"
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    _assert_intact(path, before)


def test_writer_error_without_a_message(saved, monkeypatch):
    path, before, newer = saved

    def fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError()  # no message, no OSError behind it

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(DanetError, match="RuntimeError") as e:
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    _assert_intact(path, before)


def test_failed_rename(saved, monkeypatch):
    path, before, newer = saved
    calls = []

    def fail_replace(src, dst):
        calls.append(dst)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(checkpoints.os, "replace", fail_replace)
    monkeypatch.setattr(checkpoints.os, "rename", fail_replace)
    with pytest.raises(DanetError) as e:
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    assert calls
    assert "\n" not in str(e.value)
    _assert_intact(path, before)


def test_failed_open(saved, monkeypatch):
    path, before, newer = saved
    real_open = open

    def no_space_open(file, mode="r", *args, **kwargs):
        if "w" in mode or "a" in mode or "x" in mode:
            raise ENOSPC
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", no_space_open, raising=False)
    monkeypatch.setattr(checkpoints.Path, "open", lambda self, mode="r", *a, **k: no_space_open(self, mode, *a, **k))
    with pytest.raises(DanetError) as e:
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    assert "\n" not in str(e.value)
    _assert_intact(path, before)


def test_real_short_write_with_file_size_limit(tmp_path):
    """A real failed write (no mocks): RLIMIT_FSIZE makes the kernel refuse bytes past a limit, midway."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        import torch
        from danet.checkpoints import save_checkpoint
        from danet.errors import DanetError
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_faults_common import tiny_model

        path = {str(tmp_path / "last.pth")!r}
        save_checkpoint(path, tiny_model(), {PRESET!r}, train_state={{"iter": 10}})
        size = __import__("os").path.getsize(path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
        try:
            save_checkpoint(path, tiny_model(num_classes=9), None, train_state={{"iter": 20}})
        except DanetError as e:
            print("DanetError:", e)
            sys.exit(3)
        print("saved")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "DanetError" in proc.stdout and "last.pth" in proc.stdout
    ck = read_checkpoint(tmp_path / "last.pth")
    assert ck.train_state == {"iter": 10}
    assert ck.state_dict["head.cls.conv.weight"].shape[0] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_interrupt_midway_through_torch_save(saved, monkeypatch):
    """Ctrl-C or SIGTERM (raised as an interrupt by the CLI) while a checkpoint is written: the old one stands, and
    no temporary file is left."""
    path, before, newer = saved

    def write_some_then_stop(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", write_some_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    _assert_intact(path, before)


def test_sigterm_stops_a_command_with_one_line(monkeypatch, capsys):
    import signal
    import time

    from danet import cli, zoo

    def run_until_terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal arrives here
        return 0

    monkeypatch.setattr(zoo, "run_cli", run_until_terminated)
    started = time.monotonic()
    sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        assert cli.main(["zoo"]) == 143
    finally:
        signal.signal(signal.SIGCHLD, sigchld)  # torch's, if set: the loaders of later tests in this process use it
    assert time.monotonic() - started < 20
    assert capsys.readouterr().err == "danet zoo: stopped (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler does not outlive the command


def test_sigterm_keeps_its_default_under_torchrun(monkeypatch):
    """With several processes a Python handler would wait for a collective blocked on a hung peer: SIGTERM keeps its
    default action (the process ends at once) there."""
    import signal

    from danet import cli, zoo

    seen = []
    monkeypatch.setattr(zoo, "run_cli", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["zoo"]) == 0 and seen == [signal.SIG_DFL]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["zoo"]) == 0 and seen[-1] is cli._on_sigterm


def test_sigterm_drops_torch_s_worker_check_before_the_frames_unwind(monkeypatch, capsys):
    """A SIGTERM to the process group ends the data loader's workers too; torch's SIGCHLD handler then raised in
    the iterators' __del__ as Terminated unwound their frames (20 lines of "Exception ignored"): it is gone first."""
    import signal
    import time

    from danet import cli, zoo

    seen = []

    def run_until_terminated(args):
        signal.signal(signal.SIGCHLD, lambda *a: None)  # stands for torch's (_set_SIGCHLD_handler)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            seen.append(signal.getsignal(signal.SIGCHLD))  # where a loader's __del__ would run
        return 0

    monkeypatch.setattr(zoo, "run_cli", run_until_terminated)
    sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        assert cli.main(["zoo"]) == 143
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
    assert seen == [signal.SIG_DFL] and capsys.readouterr().err == "danet zoo: stopped (SIGTERM)\n"
