"""One lock per output, held for the whole run, so two prefnoise runs never write the same place.

The lock is an ``flock`` on a small file beside the output (``.OUT.prefnoise-lock``, holding the
owner's pid). The kernel drops an ``flock`` when its process dies, however it dies, so the lock of a
run killed with ``kill -9`` is free: the next run takes it over with a note naming the dead pid, and
removes the temporary files that run left beside the output (``.OUT.tmp-PID-*``).

Only the main process of a distributed launch (``RANK`` 0 or unset) takes locks; the other ranks
write under its lock.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prefnoise.errors import PrefnoiseError

LOCK_SUFFIX = ".prefnoise-lock"
_HOLDER = re.compile(rb"^prefnoise pid (\d+)\n?$")


@dataclass
class _Held:
    fd: int
    created_dirs: list[Path] = field(default_factory=list)


_HELD: dict[Path, _Held] = {}


def note(message: str) -> None:
    """Print one ``Note:`` line on stderr (a fact the user should know; never an error)."""
    with contextlib.suppress(Exception):
        print(f"Note: {message}", file=sys.stderr, flush=True)


def lock_file_of(dest: str | Path) -> Path:
    """The lock file of output ``dest``: ``.NAME.prefnoise-lock`` in ``dest``'s (resolved) directory."""
    absolute = Path(os.path.abspath(os.path.expanduser(str(dest))))
    return absolute.parent.resolve() / f".{absolute.name}{LOCK_SUFFIX}"


def is_main_rank() -> bool:
    """Whether this is the main process of a distributed launch (or not distributed at all)."""
    return os.environ.get("RANK", "0") in ("", "0")


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> int | None | str:
    """The pid a lock file names; None when empty; ``"foreign"`` when it is not a prefnoise lock."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 64, 0)
        if not text:
            return None
        match = _HOLDER.match(text)
        return int(match.group(1)) if match else "foreign"
    return None


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; return those created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return missing


def _cannot_write(flag: str, dest: str | Path, directory: Path, error: OSError) -> PrefnoiseError:
    reason = (error.strerror or type(error).__name__).lower()
    return PrefnoiseError(f"{flag} {dest}: cannot write in {directory} ({reason}); give a writable place")


def _open_parents(path: Path, dest: str | Path, flag: str) -> list[Path]:
    """:func:`_make_parents` of the lock's directory, failing in one line that names the output."""
    try:
        return _make_parents(path.parent)
    except OSError as error:
        raise _cannot_write(flag, dest, path.parent, error) from None


def _open_lock(path: Path, dest: str | Path, flag: str, created: list[Path]) -> int:
    """A descriptor of the lock file ``path``, created if missing; one line naming the output when it cannot be."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        _remove_empty(created)
        if error.errno == errno.ENAMETOOLONG:
            raise PrefnoiseError(f"{flag} {str(dest)[:60]}...: the name is too long for the file system; "
                                 "give a shorter name") from None
        raise _cannot_write(flag, dest, path.parent, error) from None


def holds_lock(dest: str | Path) -> bool:
    """Whether this process holds the lock of output ``dest``."""
    return lock_file_of(dest) in _HELD


def acquire(dest: str | Path, *, flag: str = "OUT") -> bool:
    """Take the lock of output ``dest`` for this process; True when newly taken (False: already held).

    PrefnoiseError (exit 2) naming the holder's pid when another live prefnoise run holds it.
    """
    path = lock_file_of(dest)
    if path in _HELD or not is_main_rank():
        return False
    created = _open_parents(path, dest, flag)
    while True:
        fd = _open_lock(path, dest, flag, created)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            _remove_empty(created)
            who = f"pid {holder}" if isinstance(holder, int) else "pid unknown"
            raise PrefnoiseError(f"{flag} {dest}: in use by another prefnoise run ({who})") from None
        try:  # a run that released the lock meanwhile removed the file: lock the new one instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(fd)
    if previous == "foreign":
        os.close(fd)
        _remove_empty(created)
        raise PrefnoiseError(f"{flag} {dest}: {path} exists and is not a prefnoise lock file; remove or rename it")
    if isinstance(previous, int) and previous != os.getpid():
        note(f"{flag} {dest}: an earlier prefnoise run (pid {previous}) ended without releasing it "
             "(killed?); taking over its lock")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"prefnoise pid {os.getpid()}\n".encode(), 0)
    _HELD[path] = _Held(fd, created)
    clean_stale_temporaries(dest)
    return True


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def release(dest: str | Path) -> None:
    """Release this process's lock of output ``dest`` (nothing when it holds none)."""
    held = _HELD.pop(lock_file_of(dest), None)
    if held is not None:
        _drop(lock_file_of(dest), held)


def _drop(path: Path, held: _Held) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # while still locked, so no other run locks the file being removed
    with contextlib.suppress(OSError):
        os.close(held.fd)
    _remove_empty(held.created_dirs)


def held_locks() -> set[Path]:
    """The lock files this process holds now."""
    return set(_HELD)


def release_all(keep: set[Path] | frozenset[Path] = frozenset()) -> None:
    """Release every lock this process holds except those in ``keep`` (lock files)."""
    for path in list(_HELD):
        if path not in keep:
            _drop(path, _HELD.pop(path))


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]+$")
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[a-z0-9_]{8}$")


def temporary_prefix(dest: str | Path, kind: str = "tmp") -> str:
    """The name prefix of a temporary file or directory beside ``dest``: ``.NAME.tmp-PID-``."""
    return f".{Path(dest).name}.{kind}-{os.getpid()}-"


def clean_stale_temporaries(dest: str | Path) -> None:
    """Remove the temporary files that dead runs left beside ``dest``; name the ones of unknown owner."""
    target = Path(os.path.abspath(os.path.expanduser(str(dest))))
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    removed, unknown = [], []
    for sibling in siblings:
        match = _TEMP.match(sibling.name)
        if match and match.group("name") == target.name:
            if pid_alive(int(match.group("pid"))):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sibling.unlink()
            removed.append(sibling.name)
            continue
        match = _OLD_TEMP.match(sibling.name)
        if match and match.group("name") == target.name:
            unknown.append(sibling.name)
    if removed:
        note(f"removed {len(removed)} temporary file(s) that a killed prefnoise run left beside {dest}: "
             + ", ".join(sorted(removed)))
    if unknown:
        note(f"beside {dest} lie temporary files of an earlier prefnoise run: " + ", ".join(sorted(unknown))
             + "; remove them when no prefnoise run is writing there")


atexit.register(release_all)
