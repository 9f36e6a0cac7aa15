"""The one exception type for problems a user can cause (paths, formats, names, shapes, class counts)."""


class DanetError(Exception):
    """A user-facing error: its message is one line saying what is wrong and what to do.

    The CLI prints it without a traceback and exits with status 2.
    """
