"""The one user-facing error type: a message a person can act on, and an exit code."""

from __future__ import annotations

USAGE_OR_DATA_ERROR = 2


class PrefnoiseError(ValueError):
    """A problem with the user's input, data or options.

    The CLI prints ``message`` on one line and exits with ``exit_code`` (2 by default);
    library callers catch it as a ``ValueError`` (it is one) or by its own name.
    """

    def __init__(self, message: str, exit_code: int = USAGE_OR_DATA_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class PrefnoiseWarning(UserWarning):
    """Something a person must know that does not stop the command (e.g. an unreadable provenance
    history that restarts); the CLI prints it as one ``Warning:`` line on stderr."""
