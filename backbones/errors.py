"""The one exception type that tools turn into a one-line message and exit code 2 (DESIGN §8).

It lives in `backbones` because imports flow tools -> detect -> backbones and both packages raise it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a line, a key or a value. The message names what and where."""
