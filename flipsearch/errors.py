"""The one exception type a user can cause.

The CLI prints a ``FlipsearchError`` as a single line and exits with code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class FlipsearchError(Exception):
    """Bad input or a missing requirement, described so that the user can fix it."""


class FlipsearchWarning(UserWarning):
    """Something the user should know that did not stop the run (damaged state recovered,
    say); the CLI prints it as one line."""
