"""The one exception type for problems a user can cause (paths, formats, names, shapes, class counts), what to
say about an OSError (a full disk, a permission), and how a message names a list of classes."""

import errno


class DanetError(Exception):
    """A user-facing error: its message is one line saying what is wrong and what to do.

    The CLI prints it without a traceback and exits with status 2.
    """


OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
}


def os_hint(e: OSError, default: str | None = None) -> str | None:
    """What to do about an OSError, by its errno (`default` for the others)."""
    return OS_HINTS.get(e.errno, default)


def short(names) -> str:
    """The first class names, for a one-line message: ['a', 'b', 'c', 'd', ...]."""
    names = [str(n) for n in names]
    return str(names) if len(names) <= 4 else str(names[:4])[:-1] + ", ...]"
