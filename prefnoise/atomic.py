"""Write-then-rename, so a failed command never leaves a half-written file or directory, and the rename
never replaces what the output check did not accept (a file that appeared at OUT meanwhile is kept)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError
from prefnoise.locks import temporary_prefix
from prefnoise.outputs import claim_of, file_identity, output_dir_state, release_claim, write_marker


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

    With ``directory=True`` the temporary path is an empty directory; with ``command`` the marker
    listing its files is written into it. The move never replaces what the output check did not
    accept (:func:`publish`). The result has the user's umask.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(parent, temporary_prefix(dest), directory=directory)
    try:
        apply_umask(tmp, directory=directory)
        yield tmp
        if directory and command is not None:
            write_marker(tmp, command, live=False)
        publish(tmp, dest, directory=directory, command=command)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if claim_of(dest) is not None:
            release_claim(dest)  # the command fails: it will not write this output
        raise
    _TEMPORARY.discard(tmp)  # published: the name is the output's now
    if claim_of(dest) is not None:
        release_claim(dest)  # published: the command is done with this output


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold SIGTERM, SIGHUP and SIGINT back for the block (in the main thread), so that what it creates is in
    the hands of its cleanup before a stop signal can interrupt; a signal that came meanwhile is raised on
    leaving. A thread started in the block inherits the mask: stop signals keep going to the main thread."""
    main = threading.current_thread() is threading.main_thread()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if main else None
    try:
        yield
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending signal is raised now: cleaned up


def _new_temporary(parent: Path, prefix: str, *, directory: bool) -> Path:
    """A new temporary file or directory in ``parent``, registered for removal before any signal can
    interrupt between its creation and its registration (a SIGTERM there left it behind)."""
    with stop_signals_deferred():
        if directory:
            return register_temporary(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        return register_temporary(name)


RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError (nothing moved) when ``dst`` exists.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it; otherwise a hard link
    for a file, or a re-check just before the rename for a directory (the caller holds the output's lock).
    """
    function = _renameat2()
    if function is not None:
        result = function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), os.fsdecode(os.fsencode(dst)))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if not os.path.isdir(src):
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            os.rename(src, dst)
        else:
            os.unlink(src)
        return
    os.rename(src, dst)


def _beside(dest: Path) -> Path:
    """A free name beside ``dest`` for a result that could not go there: ``out.prefnoise-result.parquet``."""
    stem, suffix = (dest.name, "") if dest.suffix == "" or dest.name.startswith(".") else (dest.stem, dest.suffix)
    for number in range(1, 1000):
        tag = "" if number == 1 else f"-{number}"
        candidate = dest.with_name(f"{stem}.prefnoise-result{tag}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise PrefnoiseError(f"{dest}: too many earlier results lie beside it; remove some")


def _leave_beside(tmp: Path, dest: Path, what: str) -> PrefnoiseError:
    """Move the finished result ``tmp`` beside ``dest`` (kept as it is); return the one-line error to raise."""
    while True:
        beside = _beside(dest)
        try:
            rename_noreplace(tmp, beside)
            break
        except FileExistsError:
            continue
    return PrefnoiseError(f"{dest}: {what}; it was kept, and this run's result was written to {beside} instead")


def publish(tmp: Path, dest: Path, *, directory: bool, command: str | None) -> None:
    """Move the finished ``tmp`` onto ``dest``, replacing only what the output check accepted.

    A checked output (:func:`prefnoise.outputs.claim_of`) that was missing must still be missing; an
    earlier output accepted for replacement must be unchanged (a file: same inode, size and time; a
    directory: its marker still lists everything in it). Otherwise the user's file is kept and the
    result left beside it (PrefnoiseError, exit 2).
    """
    claim = claim_of(dest)
    if directory:
        state = output_dir_state(dest, command or "")
        if state == "foreign":
            raise _leave_beside(tmp, dest, "changed while prefnoise ran (it holds files prefnoise did not write)")
        if state == "missing":
            _publish_new(tmp, dest)
            return
        old = Path(tempfile.mkdtemp(prefix=temporary_prefix(dest, "old"), dir=dest.parent))
        os.replace(dest, old / "x")
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            raise _leave_beside(tmp, dest, "appeared while prefnoise ran") from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    now = file_identity(dest)
    if claim is None:
        os.replace(tmp, dest)  # an internal file inside an output this run owns (cache, checkpoint)
    elif now is None:
        _publish_new(tmp, dest)
    elif now == claim.identity:
        os.replace(tmp, dest)  # the earlier prefnoise output the check accepted, unchanged
    else:
        what = "appeared" if claim.identity is None else "changed"
        raise _leave_beside(tmp, dest, f"{what} while prefnoise ran (this run did not write it)")


def _publish_new(tmp: Path, dest: Path) -> None:
    try:
        rename_noreplace(tmp, dest)
    except FileExistsError:
        raise _leave_beside(tmp, dest, "appeared while prefnoise ran (this run did not write it)") from None


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
