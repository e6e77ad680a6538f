"""Where prefnoise may write: one output policy for every command.

prefnoise never removes or replaces a file or directory it did not create:

- an output **file** that exists is replaced only with ``overwrite`` and only when prefnoise wrote it
  (a Parquet file carrying prefnoise's provenance metadata, a PNG whose ``Software`` field names
  prefnoise);
- an output **directory** that exists is used only when it is empty, or replaced (with ``overwrite``)
  when it is an earlier output of the same command: its marker file lists every file prefnoise wrote
  there (path, size, sha256) and the directory holds nothing else and nothing changed since;
- no output may be an input, lie inside an input directory, or be ``/``, the working directory or
  an ancestor of either or of an input;
- a checked output is *claimed*: its lock (:mod:`prefnoise.locks`) is held until the command ends,
  and the final publish (:mod:`prefnoise.atomic`) replaces only what the check accepted.

The checks run before any work starts, so a mistake costs a second, not an hour of training.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from prefnoise import __version__, locks
from prefnoise.errors import PrefnoiseError

MARKER = ".prefnoise-output.json"
CACHE_ENV = "PREFNOISE_CACHE_DIR"
STDOUT = "-"
PNG_SOFTWARE = "prefnoise"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def default_cache_dir() -> Path:
    """Where prefnoise keeps its own caches (embeddings, audit margins): $PREFNOISE_CACHE_DIR, else
    ~/.cache/prefnoise."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefnoise")


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_name(dest: str | Path, flag: str) -> Path:
    text = str(dest)
    if not text.strip():
        raise PrefnoiseError(f"{flag}: the output name is empty; give a file or directory name")
    return Path(text)


def _check_against_inputs(dest: Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    """Refuse an output that is an input, lies inside an input directory or contains an input."""
    target = _resolved(dest)
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == cwd or target in cwd.parents:
        raise PrefnoiseError(
            f"{flag} {dest}: is {'the working directory' if target == cwd else 'an ancestor of the working directory'}"
            "; give a new directory for the output"
        )
    for given in inputs:
        if given is None or str(given) in ("", STDOUT):
            continue
        source = _resolved(given)
        if target == source or _same_file(target, source):
            raise PrefnoiseError(
                f"{flag} {dest}: is the input {given}; prefnoise never writes over an input, give another name"
            )
        if source in target.parents:
            raise PrefnoiseError(
                f"{flag} {dest}: lies inside the input directory {given}; write the output somewhere else"
            )
        if target in source.parents:
            raise PrefnoiseError(
                f"{flag} {dest}: contains the input {given}; give a new directory for the output"
            )


def _check_parent(dest: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable directory (missing ones are created)."""
    parent = _resolved(dest).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrefnoiseError(f"{flag} {dest}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrefnoiseError(f"{flag} {dest}: cannot write into {parent} (permission denied)")


def written_by_prefnoise(path: str | Path) -> bool:
    """Whether the file at ``path`` is one prefnoise wrote (Parquet provenance or PNG Software field)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return stream_written_by_prefnoise(handle)
    except OSError:  # an unreadable file is not one of ours
        return False


def stream_written_by_prefnoise(handle: BinaryIO) -> bool:
    """Whether the seekable binary file ``handle`` (a local file, or a pyarrow filesystem's input file: only
    the head and the Parquet footer are read) is one prefnoise wrote, as :func:`written_by_prefnoise`."""
    try:
        head = handle.read(8)
        handle.seek(0)
        if head[:4] == b"PAR1":
            import pyarrow.parquet as pq  # only to read a Parquet footer; most checks never need it

            # tables carry b"prefnoise" (provenance), caches b"prefnoise.<what>"
            return any(key.startswith(b"prefnoise") for key in (pq.read_metadata(handle).metadata or {}))
        if head == _PNG_MAGIC:
            from PIL import Image  # pillow comes with matplotlib: loaded only to read a PNG's tag

            with Image.open(handle) as image:
                return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except Exception:  # an unreadable file is not one of ours
        return False
    return False


def _ends_with_separator(dest: str | Path) -> bool:
    text = str(dest)
    return text.endswith("/") or (os.altsep is not None and text.endswith(os.altsep)) or text.endswith(os.sep)


def check_output_file(
    dest: str | Path | None,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    flag: str = "OUT",
    suffix: str | None = None,
) -> None:
    """Raise PrefnoiseError unless prefnoise may write the file ``dest`` (``-``: stdout, always fine).

    ``suffix`` (e.g. ".png"): the only file type written there. On success ``dest`` is claimed: its
    lock is held until the command ends (a second run on it exits 2), and the final rename replaces
    only the earlier prefnoise output accepted here (:func:`claim_of`).
    """
    if dest is None or str(dest) == STDOUT:
        return
    path = _check_name(dest, flag)
    if _ends_with_separator(dest):
        raise PrefnoiseError(
            f"{flag} {dest}: ends with '/', which names a directory; this command writes a file, give a file name"
        )
    if suffix is not None and path.suffix.lower() != suffix:
        raise PrefnoiseError(f"{flag} {dest}: only {suffix} files are written here; name the file *{suffix}")
    _check_against_inputs(path, inputs, flag)
    _check_existing_file(path, dest, overwrite, flag)
    _check_parent(path, flag)
    newly = locks.acquire(path, flag=flag)
    try:
        _check_existing_file(path, dest, overwrite, flag)  # again, now that no other run can write it
    except BaseException:
        if newly:
            locks.release(path)
        raise
    if newly or claim_of(path) is None:
        _CLAIMS[locks.lock_file_of(path)] = Claim(directory=False, identity=file_identity(path), command=None)


def _check_existing_file(path: Path, dest: str | Path, overwrite: bool, flag: str) -> None:
    if path.is_dir():
        raise PrefnoiseError(f"{flag} {dest}: is a directory; give a file name")
    if path.exists() or path.is_symlink():
        check_replaceable(dest, suffix=path.suffix, ours=lambda: written_by_prefnoise(path), overwrite=overwrite,
                          flag=flag)


def check_replaceable(dest: str | Path, *, suffix: str, ours: Callable[[], bool], overwrite: bool, flag: str) -> None:
    """Raise PrefnoiseError unless the existing file ``dest`` (named by its ``suffix``) may be replaced: never a
    JSON lines or CSV file (they carry no provenance), never one ``ours()`` does not prove prefnoise wrote, and
    an earlier prefnoise output only with ``overwrite``. Local outputs and remote ones (prefnoise.engine.uris)."""
    if suffix.lower() in (".jsonl", ".csv"):
        raise PrefnoiseError(
            f"{flag} {dest}: exists; JSON lines and CSV files carry no provenance, so prefnoise cannot tell "
            "whether it wrote this one and never replaces it (even with --overwrite); remove it or use another name"
        )
    if not ours():
        raise PrefnoiseError(
            f"{flag} {dest}: exists and was not written by prefnoise, which never replaces such files; "
            "give another name"
        )
    if not overwrite:
        raise PrefnoiseError(f"{flag} {dest}: exists (an earlier prefnoise output); pass --overwrite to replace it")


def check_distinct_outputs(outputs: dict[str, str | Path | None]) -> None:
    """PrefnoiseError when two outputs of one command (flag → path) name the same file."""
    seen: dict[Path, str] = {}
    for flag, dest in outputs.items():
        if dest is None or str(dest) == STDOUT:
            continue
        target = _resolved(dest)
        if target in seen:
            raise PrefnoiseError(f"{seen[target]} and {flag} name the same file; give each its own")
        seen[target] = flag


# --------------------------------------------------------------------------- claims

@dataclass(frozen=True)
class Claim:
    """What the check of one output accepted: a file or directory, and the identity of an existing
    file it may replace (None: nothing may be replaced; the output must still be missing)."""

    directory: bool
    identity: tuple[int, int, int, int] | None
    command: str | None


_CLAIMS: dict[Path, Claim] = {}


def file_identity(path: str | Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of the file at ``path``, or None when there is none."""
    try:
        stat = os.lstat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def claim_of(dest: str | Path) -> Claim | None:
    """The claim this process holds on output ``dest``, or None (an internal file, not a checked output)."""
    key = locks.lock_file_of(dest)
    return _CLAIMS.get(key) if key in locks.held_locks() else None


def release_claim(dest: str | Path) -> None:
    """Release the claim (and lock) of output ``dest``."""
    _CLAIMS.pop(locks.lock_file_of(dest), None)
    locks.release(dest)


def release_claims(keep: frozenset[Path] | set[Path] = frozenset()) -> None:
    """Release every claim and lock this process holds, except the lock files in ``keep``."""
    for key in list(_CLAIMS):
        if key not in keep:
            _CLAIMS.pop(key, None)
    locks.release_all(keep)


F = TypeVar("F", bound=Callable[..., Any])


def releases_outputs(function: F) -> F:
    """Decorate a command so that the outputs it claims are released when it returns or fails."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = frozenset(locks.held_locks())
        try:
            return function(*args, **kwargs)
        finally:
            release_claims(keep=before)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- the marker and its manifest

# What a training run keeps writing into its output directory while it runs (and after a kill):
# a marker written at the start of a run ("live") owns these names without listing their files.
RUN_NAMES = frozenset({"checkpoints", "runs", "metrics.jsonl", "model", "summary.json", "ref_logps.parquet"})
_RUN_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-")
_SHOWN = 5


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _walk(directory: Path, unreadable: list[str] | None = None) -> Iterable[tuple[str, Path]]:
    """(relative posix path, path) of every file and link under ``directory``, links not followed;
    sub-directories that cannot be listed are appended to ``unreadable``."""

    def note(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append(Path(error.filename).relative_to(directory).as_posix())

    for root, dirs, files in os.walk(directory, followlinks=False, onerror=note):
        here = Path(root)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            yield path.relative_to(directory).as_posix(), path


def _entry(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        return {"link": os.readlink(path)}
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def manifest_of(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory`` but the marker: relative path → {size, sha256} (links: {link})."""
    directory = Path(directory)
    return {rel: _entry(path) for rel, path in _walk(directory) if rel != MARKER}


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker prefnoise writes into every output directory, or None when there is none."""
    marker = Path(directory) / MARKER
    try:
        if marker.is_symlink() or marker.stat().st_size > 64 << 20:
            return None
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def write_marker(directory: str | Path, command: str, *, live: bool = True) -> None:
    """Mark ``directory`` as the output of ``prefnoise command``, listing every file in it now.

    ``live``: a training run's directory, which keeps writing :data:`RUN_NAMES` after this; the marker
    owns those names as they grow. Without ``live`` the listing is complete (a published output).
    """
    directory = Path(directory)
    record = {
        "command": command,
        "prefnoise_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "live": live,
        "files": manifest_of(directory),
    }
    tmp = directory / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MARKER)


def _run_owned(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    match = _RUN_TEMPORARY.match(top)
    return top in RUN_NAMES or (match is not None and match.group("name") in RUN_NAMES)


def manifest_problems(directory: str | Path, marker: dict[str, Any] | None = None) -> list[str]:
    """Why ``directory``'s marker does not prove prefnoise wrote everything in it (empty: it does).

    Each item names a file: one the marker does not list, or one changed since prefnoise wrote it.
    """
    directory = Path(directory)
    marker = read_marker(directory) if marker is None else marker
    listed = marker.get("files") if marker is not None else None
    if not isinstance(listed, dict):
        return [f"{MARKER} lists no files (made by hand, or by an earlier prefnoise version)"]
    live = marker.get("live") is True
    problems: list[str] = []
    unreadable: list[str] = []
    for rel, path in _walk(directory, unreadable):
        if rel == MARKER or (live and _run_owned(rel)):
            continue
        entry = listed.get(rel)
        if not isinstance(entry, dict):
            problems.append(f"{rel} (not written by prefnoise)")
        elif _differs(path, entry):
            problems.append(f"{rel} (changed since prefnoise wrote it)")
    return problems + [f"{rel} (cannot be listed)" for rel in unreadable if not (live and _run_owned(rel))]


def _differs(path: Path, entry: dict[str, Any]) -> bool:
    try:
        if path.is_symlink() or "link" in entry:
            return not path.is_symlink() or os.readlink(path) != entry.get("link")
        return path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256")
    except OSError:
        return True


def _named(problems: list[str]) -> str:
    shown = ", ".join(problems[:_SHOWN])
    return shown + (f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")


def output_dir_state(dest: str | Path, command: str) -> str:
    """'missing', 'empty', 'ours' (an earlier output of ``command`` whose marker lists everything in it,
    unchanged) or 'foreign' for directory ``dest``."""
    path = Path(dest)
    if not path.exists() and not path.is_symlink():
        return "missing"
    if not path.is_dir() or path.is_symlink():
        return "foreign"
    if not any(path.iterdir()):
        return "empty"
    marker = read_marker(path)
    if marker is None or marker.get("command") != command:
        return "foreign"
    return "foreign" if manifest_problems(path, marker) else "ours"


def check_output_dir(
    dest: str | Path,
    *,
    command: str,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> str:
    """Raise PrefnoiseError unless ``command`` may write directory ``dest``; return its state.

    The state is that of :func:`output_dir_state`. An earlier output of the same command is
    accepted with ``overwrite`` (it will be replaced) or ``resume`` (it will be continued). On
    success ``dest`` is claimed: its lock is held until the command ends (a second run exits 2).
    """
    path = _check_name(dest, flag)
    _check_against_inputs(path, inputs, flag)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise PrefnoiseError(f"{flag} {dest}: exists and is not a directory; give a new directory name")
    _check_parent(path, flag)
    newly = locks.acquire(path, flag=flag)
    try:
        state = _check_dir_state(path, dest, command, overwrite or resume, flag)
    except BaseException:
        if newly:
            locks.release(path)
        raise
    _CLAIMS[locks.lock_file_of(path)] = Claim(directory=True, identity=None, command=command)
    return state


def _check_dir_state(path: Path, dest: str | Path, command: str, accepted: bool, flag: str) -> str:
    state = output_dir_state(path, command)
    if state == "foreign":
        if path.is_symlink():
            raise PrefnoiseError(f"{flag} {dest}: is a symbolic link; give a new directory name")
        other = read_marker(path)
        if other is None:
            what = "exists, is not empty and was not created by prefnoise"
        elif other.get("command") != command:
            what = f"holds the output of `prefnoise {other.get('command')}`"
        else:
            problems = _named(manifest_problems(path, other))
            what = f"holds files prefnoise did not write or that changed since: {problems}"
        raise PrefnoiseError(f"{flag} {dest}: {what}; prefnoise will not replace it, give a new directory")
    if state == "ours" and not accepted:
        raise PrefnoiseError(
            f"{flag} {dest}: holds an earlier `prefnoise {command}` output; pass --overwrite to replace it"
            + (" or --resume to continue it" if command in ("align", "fit-reward") else "")
        )
    return state
