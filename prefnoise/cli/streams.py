"""Standard streams a command can rely on: closed ones filled, odd file names printable.

Started with ``>&-`` (stdout closed) a process would hand descriptor 1 to the next file it opens,
and a report printed later would land inside that file. :func:`guard_standard_streams` points every
closed standard descriptor at ``/dev/null`` first; writing to a closed stdout then fails in one line
(exit 2), as writing to a full disk does. Names that are not valid UTF-8 (kept by Python as lone
surrogates) are printed escaped (``\\xff``) instead of failing.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

from prefnoise.errors import PrefnoiseError

CLOSED_STDOUT = "cannot write to standard output: it is closed (>&-); redirect it instead (>/dev/null)"


class _ClosedBuffer(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise PrefnoiseError(CLOSED_STDOUT)


class ClosedStdout(io.TextIOBase):
    """Stands in for a stdout that was closed at start: every write is a one-line PrefnoiseError."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = _ClosedBuffer()

    def write(self, text: str) -> int:
        raise PrefnoiseError(CLOSED_STDOUT)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1

    def flush(self) -> None:
        """Nothing was buffered."""


def guard_standard_streams() -> None:
    """Fill closed descriptors 0-2 with /dev/null; make stdout and stderr print odd characters escaped."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 0:
                sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115  (lives as long as the process)
            elif fd == 1:
                sys.stdout = ClosedStdout()
            else:
                sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def printable_name(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (lone surrogates) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def check_utf8_names(values: dict[str, object]) -> None:
    """PrefnoiseError naming (escaped) the first argument that is not valid UTF-8: Arrow and polars
    cannot open such file names or hold such column names."""
    for value in values.values():
        for text in value if isinstance(value, list | tuple) else [value]:
            if isinstance(text, str) and _has_surrogates(text):
                raise PrefnoiseError(
                    f"{printable_name(text)}: the name is not valid UTF-8, which the table libraries cannot open "
                    "or write; rename it (an input may also be piped in: prefnoise COMMAND - ... < FILE)"
                )
    _check_working_directory()


def _check_working_directory() -> None:
    """PrefnoiseError when the current directory's path is not valid UTF-8: relative names resolve inside
    it (temporary files are made beside the output by absolute path), which the table libraries cannot open."""
    try:
        cwd = os.getcwd()
    except OSError:  # a deleted working directory: relative names fail later, naming the file
        return
    if _has_surrogates(cwd):
        raise PrefnoiseError(
            f"the current directory {printable_name(cwd)} is not valid UTF-8, which the table libraries cannot "
            "open or write under; run prefnoise from another directory"
        )
