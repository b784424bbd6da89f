"""The exception types that tools turn into one-line messages (DESIGN §8).

`UserError` is bad input (exit code 2); `RunError` is a run stopped by its surroundings, not by its input (a full
disk, an output folder gone read-only, a loader worker killed by the out-of-memory killer: exit code 1), and
`OutputError` the case of a file that could not be written. They live in `backbones` because imports flow
tools -> detect -> backbones and both packages raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a line, a key or a value. The message names what and where."""


class RunError(Exception):
    """A run stopped by its environment: the message says what happened, what survived and how to go on."""


class OutputError(RunError, OSError):
    """A file could not be written (no space left, read-only or vanished folder); names the file and the cause.

    Also an `OSError`, so code that catches the write's own error type keeps working."""
