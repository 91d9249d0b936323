"""Errors that carry a user-facing message.

Library code raises :class:`UsageError` for bad input (a flag value, a missing or foreign file);
``main.py`` prints its message as one line and exits with code 2.
"""


class UsageError(ValueError):
    """Bad user input: a flag, a file or a combination of them. ``str(err)`` is the whole message."""

    def __init__(self, message: str, flag: str | None = None):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and stopped cleanly; ``main.py`` prints the message and exits
    with ``128 + signum``, the shell's code for a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        self.signum = int(signum)
        super().__init__(message)
