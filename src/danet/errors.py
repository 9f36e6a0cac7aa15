"""The one exception type for problems a user can cause (paths, formats, names, shapes, class counts), what to
say about an OSError (a full disk, a permission), and how a message names a list of classes."""

import errno
import sys


class DanetError(Exception):
    """A user-facing error: its message is one line saying what is wrong and what to do.

    The CLI prints it without a traceback and exits with status 2.
    """


OS_HINTS = {
    errno.ENOSPC: "free some space or {elsewhere}",
    errno.EDQUOT: "free some space or {elsewhere}",
    errno.EACCES: "check the permissions or {elsewhere}",
    errno.EPERM: "check the permissions or {elsewhere}",
    errno.EROFS: "the file system is read-only: {elsewhere}",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
}


def os_hint(e: OSError, default: str | None = None, elsewhere: str = "write elsewhere") -> str | None:
    """What to do about an OSError, by its errno (`default` for the others); `elsewhere`: how to write elsewhere
    (e.g. "pick another --out")."""
    hint = OS_HINTS.get(e.errno)
    return hint.format(elsewhere=elsewhere) if hint else default


def short(names) -> str:
    """The first class names, for a one-line message: ['a', 'b', 'c', 'd', ...]."""
    names = [str(n) for n in names]
    return str(names) if len(names) <= 4 else str(names[:4])[:-1] + ", ...]"


def note(message: str) -> None:
    """A one-line note on stderr (stdout keeps a command's results: tables, metrics): "note: <message>"."""
    print(f"note: {message}", file=sys.stderr, flush=True)
