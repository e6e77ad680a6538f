"""Write-then-rename, so a failed command never leaves a half-written file or directory."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefnoise.errors import PrefnoiseError


@functools.cache
def user_umask() -> int:
    """The process umask (read once; the first call must happen before threads start writing files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, *, directory: bool) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it under the user's umask.

    ``mkstemp``/``mkdtemp`` create private 0600/0700 entries; an output must not stay that way.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~user_umask())


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, directory: bool = False, command: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds.

    With ``directory=True`` the temporary path is an empty directory. It replaces an existing
    ``dest`` only when that is empty or carries the marker of an earlier ``command`` output
    (:mod:`prefnoise.outputs`); with ``command`` the marker is written into the new directory.
    The result has the user's umask.
    """
    from prefnoise.outputs import output_dir_state, write_marker

    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        apply_umask(tmp, directory=directory)
        yield tmp
        if directory:
            if command is not None:
                write_marker(tmp, command)
            state = output_dir_state(dest, command or "")
            if state == "foreign":
                raise PrefnoiseError(f"{dest}: exists and was not written by prefnoise here; it was left untouched")
            if state in ("ours", "empty"):
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
                os.replace(dest, old / "x")
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(dest: str | Path, text: str) -> None:
    """Write ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


_TEMPORARY: set[Path] = set()


def register_temporary(path: str | Path) -> Path:
    """Remember a temporary file or directory to remove when the command ends, however it ends."""
    path = Path(path)
    _TEMPORARY.add(path)
    return path


def remove_temporary_files() -> None:
    """Remove every registered temporary file and directory (also at interpreter exit)."""
    while _TEMPORARY:
        path = _TEMPORARY.pop()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


atexit.register(remove_temporary_files)
