"""Errors that carry a user-facing message.

Library code raises :class:`UsageError` for bad input (a flag value, a missing or foreign file);
``main.py`` prints its message as one line and exits with code 2. A component says what is wrong with a value
it was given; the stage that read the value from a flag names the flag (passing ``flag``, or calling the
component inside :func:`for_flag`), so the line names it.
"""

import contextlib
from typing import Iterator


def shown(text: str, limit: int = 60) -> str:
    """``text`` as an error message quotes it: whole when short, else cut, with its length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class UsageError(ValueError):
    """Bad user input: a flag, a file or a combination of them. ``str(err)`` is the whole message."""

    def __init__(self, message: str, flag: str | None = None):
        self.flag = flag
        self.message = message
        super().__init__(f"{flag}: {message}" if flag else message)


@contextlib.contextmanager
def for_flag(flag: str) -> Iterator[None]:
    """Inside the block, a :class:`UsageError` that names no flag is raised again naming ``flag`` (same class, same
    message): the component said what is wrong with a value, the stage that read the value from ``flag`` says
    where it came from. An error that names a flag already keeps it."""
    try:
        yield
    except UsageError as err:
        if err.flag is not None:
            raise
        raise type(err)(err.message, flag) from None


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and stopped cleanly; ``main.py`` prints the message and exits
    with ``128 + signum``, the shell's code for a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        self.signum = int(signum)
        super().__init__(message)
