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


def _cli_under_file_size_limit(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """`danet ARGV` in a fresh interpreter whose files may not grow past `limit` bytes (RLIMIT_FSIZE: the kernel
    refuses the write with EFBIG, as a full disk refuses it with ENOSPC)."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
        from danet.cli import main
        sys.exit(main({list(map(str, argv))!r}))
        """
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_torch_export_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    """torch's C++ file writer reported the failed write as a RuntimeError ('unexpected pos ...') and aborted the
    process while unwinding (exit 134, 30 C++ frames): the program is serialised in memory and written from Python."""
    ck = tmp_path / "model.pth"
    save_checkpoint(ck, tiny_model(), PRESET)
    (tmp_path / "m.pt2").write_bytes(b"older export")
    proc = _cli_under_file_size_limit(20_000, "export", ck, "--torch-export", tmp_path / "m.pt2", "--size", "32", "32")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"danet export: error: cannot write {tmp_path / 'm.pt2'}: File too large")
    assert (tmp_path / "m.pt2").read_bytes() == b"older export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.pt2", "model.pth"]  # fmt: skip


def test_a_log_line_or_the_synthetic_data_that_do_not_fit_name_their_file(tmp_path, monkeypatch):
    """A full disk said only 'No space left on device' for the log and the synthetic data (which folder?), and left
    a torn last line in log.jsonl."""
    from danet.data import synthetic
    from danet.engine.logging import RunLogger, read_log

    logger = RunLogger(tmp_path)
    logger.log("train", iter=1, loss=1.5)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])  # some of it lands
            raise ENOSPC

    monkeypatch.setattr("builtins.open", lambda path, *a, **k: FullDisk(real_open(path, *a, **k)))
    with pytest.raises(DanetError, match=rf"cannot write {tmp_path / 'log.jsonl'}: No space left on device; free"):
        logger.log("train", iter=2, loss=1.25)
    monkeypatch.undo()
    assert [r["iter"] for r in read_log(tmp_path / "log.jsonl")] == [1]
    assert (tmp_path / "log.jsonl").read_text().endswith("}\n")  # no torn line

    def full(out):
        (out / "images").mkdir()
        raise ENOSPC

    monkeypatch.setattr(synthetic, "generate", full)
    with pytest.raises(DanetError, match=rf"cannot write the synthetic data \(3.3 MB\) under {tmp_path / 'c'}: No sp"):
        synthetic.ensure_synthetic(tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())  # the half-made folder is gone


def test_outputs_through_a_link_to_a_folder_not_made_yet_and_cleanup_on_a_read_only_folder(tmp_path, monkeypatch):
    """A --work-dir / --out that is a symbolic link to a folder not made yet: 'cannot create ...: File exists'; now
    its target is made. A temporary file's clean-up on a read-only folder (EROFS even for a file that is not there)
    replaced the write's own error, naming the hidden temporary file."""
    from danet import files

    link = tmp_path / "L"
    link.symlink_to(tmp_path / "target" / "deeper")
    files.make_dir(link)
    assert (tmp_path / "target" / "deeper").is_dir() and link.is_symlink()

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(type(tmp_path), "unlink", read_only)
    files.discard(tmp_path / ".x.tmp-1")  # no error of its own


def test_an_interrupt_midway_through_torch_s_writer_stays_an_interrupt(saved, monkeypatch):
    """torch's zip writer wraps an interrupt that lands inside it (Ctrl-C, a batch scheduler's SIGTERM) in a
    RuntimeError ('unexpected pos ...'): it was reported as a disk error, 'check free disk space' (exit 2)."""
    path, before, newer = saved

    def interrupted_inside(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", interrupted_inside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, newer, PRESET, train_state={"iter": 20})
    _assert_intact(path, before)


def test_a_loader_worker_says_nothing_when_the_main_process_has_gone(capsys):
    """A SIGTERM to the process group: a worker's fd-sharing thread met the closed connection and printed a
    traceback under the command's one line; other errors still print."""
    from danet.data.base import _quiet_when_the_main_process_is_gone as hook

    for exc in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError()):
        hook(type(exc), exc, None)
    assert capsys.readouterr().err == ""
    hook(ValueError, ValueError("a real one"), None)
    assert "ValueError: a real one" in capsys.readouterr().err
