"""Outputs written atomically: a temporary file beside the target, then os.replace, so that a failed write (a full
disk, a kill) leaves the previous file and no partial one. `replace_target` says which file that replaces."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from .errors import DanetError

KINDS = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a named pipe",
         stat.S_ISSOCK: "a socket"}  # fmt: skip


def replace_target(path: str | Path, follow: bool = True) -> Path:
    """The path an atomic write to `path` replaces. `follow`: where `path` is a symbolic link, the file it points to
    (the link stays a link and its file gets the content: a --json or picture the user pointed somewhere); else the
    link itself (checkpoints, downloads and dataset files: a link in a work dir may point to the run's own input).
    DanetError where `path` is (or, following, leads to) a device, a named pipe or a socket, which os.replace would
    swap for a regular file (as root, /dev/full or /dev/stdout themselves), and where it is a process's open file
    (/dev/stdout redirected to a file: the write would replace that file). Folders are left to the callers' own
    one-line refusals."""
    link = Path(path).is_symlink()
    if _open_file_link(path):
        raise DanetError(
            f"{path} is a stream of this process (as /dev/stdout, /dev/fd/N), not a file: outputs are written whole "
            "(a temporary file renamed into place), which would replace a file the stream is redirected to and "
            "cannot go through a pipe; give a file path"
        )
    try:
        mode = os.stat(path, follow_symlinks=follow).st_mode  # NOTE: a link into /proc (/dev/stdout) too
    except OSError:
        mode = None  # a new file (or a path the write itself will report)
    kind = next((name for test, name in KINDS.items() if test(mode)), None) if mode is not None else None
    if kind is not None:
        raise DanetError(f"{path} is {kind}, not a file: an output written there would replace it; give a file path")
    return Path(os.path.realpath(path)) if follow and link else Path(path)


def _open_file_link(path: str | Path) -> bool:
    """Whether `path` is, or its chain of links passes through, /proc/<pid>/fd or /dev/fd (/dev/stdout, /dev/stderr):
    following it leads to whatever the stream is redirected to, which an atomic write would replace with a new file
    (a shell's `> log.txt` losing what was printed before)."""
    p = os.path.abspath(path)
    for _ in range(40):  # NOTE: the kernel's own limit on a chain of links
        parts = Path(p).parts
        if parts[:3] == ("/", "dev", "fd") or (parts[:2] == ("/", "proc") and "fd" in parts[3:4]):
            return True
        if not os.path.islink(p):
            return False
        p = os.path.join(os.path.dirname(p), os.readlink(p))
    return False


NAME_MAX = 255  # bytes of one file name (Linux, macOS)


def temp_beside(path: Path, tag: str, keep_suffix: bool = False, reserve: int = 0) -> Path:
    """A temporary name beside `path` for an atomic write: `.<name>.<tag><pid>` (`keep_suffix`: `.<stem>.<tag><pid>
    <suffix>`, for writers that choose a format by it). Where that name would pass the file system's 255 bytes (a
    legal name that long) or `path`'s name is not valid UTF-8 (which the C++ writers of torch cannot take), a hash
    of the name stands for it: `.danet-<12 hex>.<tag><pid>`. `reserve`: bytes a caller adds to the name."""
    suffix = path.suffix if keep_suffix else ""
    name = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = f".{name}.{tag}{os.getpid()}{suffix}"
    try:
        fits = len(tmp.encode("utf-8")) + reserve <= NAME_MAX
    except UnicodeEncodeError:  # NOTE: undecodable bytes of the name (surrogate escapes)
        fits = False
    if not fits:
        digest = hashlib.sha1(os.fsencode(path.name)).hexdigest()[:12]
        suffix = suffix if suffix.isascii() and len(suffix) <= 16 else ""
        tmp = f".danet-{digest}.{tag}{os.getpid()}{suffix}"
    return path.with_name(tmp)


def make_dir(path: Path) -> None:
    """`path.mkdir(parents=True, exist_ok=True)`, where `path` may be a symbolic link to a folder not made yet: its
    target is made (mkdir said 'File exists' of the link). OSError as mkdir's."""
    if path.is_symlink() and not path.exists():
        path = Path(os.path.realpath(path))
    path.mkdir(parents=True, exist_ok=True)


def discard(tmp: str | Path) -> None:
    """Remove a temporary file if it is there; a failure to (a read-only or vanished folder) is not the error to
    report: the write's own is."""
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` (see `replace_target`) via a temp file in the same folder and os.replace (survives a
    crash). An OSError names `path`, not the temporary file."""
    path = replace_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_beside(path, "", reserve=12).name, suffix=".tmp")
    except OSError as e:
        e.filename = str(path)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # NOTE: mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        discard(tmp)
        if isinstance(e, OSError):
            e.filename = str(path)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    """`src` to `dst` (a link there replaced, not written through) through a temporary file beside it: a full disk
    leaves no partial copy; one-line DanetError."""
    dst = replace_target(dst, follow=False)
    tmp = temp_beside(dst, "tmp-")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        discard(tmp)
        raise DanetError(f"cannot copy {src} to {dst}: {e.strerror or e}; free some space, then run again") from None


def remove_dead_temporaries(folder: str | Path, pattern: str, stale_s: float = 0.0) -> list[Path]:
    """Remove the temporary files in `folder` whose names match `pattern` (its group "pid": the writer's process id)
    and whose writer no longer runs here (`stale_s`: nor changed them for that long, for a writer on another machine
    of a shared disk, whose process ids are another's). Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*"):
        m = re.fullmatch(pattern, tmp.name)
        if m is None or pid_running(int(m.group("pid"))):
            continue
        try:
            if stale_s and time.time() - tmp.stat().st_mtime < stale_s:
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # NOTE: a leftover that cannot be removed harms nothing: it is hidden and never read
    return removed


def pid_running(pid: int) -> bool:
    """Whether a process of that id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is another user's
        return True
    return True
