"""User-facing errors.

Anything the user can fix (a missing path, an unknown name, a bad option, a
corrupt input file) is raised as :class:`UserError`. The CLI prints its message
on one line and exits with code 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; reported in one line, exit code 2."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
