"""Where prefnoise may write: one output policy for every command.

prefnoise never removes or replaces a file or directory it did not create:

- an output **file** that exists is replaced only with ``overwrite`` and only when prefnoise wrote it
  (a Parquet file carrying prefnoise's provenance metadata, a PNG whose ``Software`` field names
  prefnoise);
- an output **directory** that exists is used only when it is empty, or replaced (with ``overwrite``)
  when it holds the marker file of an earlier run of the same command;
- no output may be an input, lie inside an input directory, or be ``/``, the working directory or
  an ancestor of either or of an input.

The checks run before any work starts, so a mistake costs a second, not an hour of training.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefnoise import __version__
from prefnoise.errors import PrefnoiseError

MARKER = ".prefnoise-output.json"
STDOUT = "-"
PNG_SOFTWARE = "prefnoise"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
            head = handle.read(8)
        if head[:4] == b"PAR1":
            import pyarrow.parquet as pq

            # tables carry b"prefnoise" (provenance), caches b"prefnoise.<what>"
            return any(key.startswith(b"prefnoise") for key in (pq.read_metadata(path).metadata or {}))
        if head == _PNG_MAGIC:
            from PIL import Image

            with Image.open(path) as image:
                return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except Exception:  # an unreadable file is not one of ours
        return False
    return False


def check_output_file(
    dest: str | Path | None,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    flag: str = "OUT",
    suffix: str | None = None,
) -> None:
    """Raise PrefnoiseError unless prefnoise may write the file ``dest`` (``-``: stdout, always fine).

    ``suffix`` (e.g. ".png"): the only file type written there.
    """
    if dest is None or str(dest) == STDOUT:
        return
    path = _check_name(dest, flag)
    if suffix is not None and path.suffix.lower() != suffix:
        raise PrefnoiseError(f"{flag} {dest}: only {suffix} files are written here; name the file *{suffix}")
    _check_against_inputs(path, inputs, flag)
    if path.is_dir():
        raise PrefnoiseError(f"{flag} {dest}: is a directory; give a file name")
    if path.exists() or path.is_symlink():
        if path.suffix.lower() in (".jsonl", ".csv") and not path.is_dir():
            raise PrefnoiseError(
                f"{flag} {dest}: exists; JSON lines and CSV files carry no provenance, so prefnoise cannot tell "
                "whether it wrote this one and never replaces it (even with --overwrite); remove it or use another name"
            )
        if not written_by_prefnoise(path):
            raise PrefnoiseError(
                f"{flag} {dest}: exists and was not written by prefnoise, which never replaces such files; "
                "give another name"
            )
        if not overwrite:
            raise PrefnoiseError(f"{flag} {dest}: exists (an earlier prefnoise output); pass --overwrite to replace it")
    _check_parent(path, flag)


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


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker prefnoise writes into every output directory, or None when there is none."""
    marker = Path(directory) / MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_marker(directory: str | Path, command: str) -> None:
    """Mark ``directory`` as the output of ``prefnoise command`` (so a later run may replace it)."""
    record = {
        "command": command,
        "prefnoise_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (Path(directory) / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def output_dir_state(dest: str | Path, command: str) -> str:
    """'missing', 'empty', 'ours' (an earlier output of ``command``) or 'foreign' for directory ``dest``."""
    path = Path(dest)
    if not path.exists() and not path.is_symlink():
        return "missing"
    if not path.is_dir():
        return "foreign"
    if not any(path.iterdir()):
        return "empty"
    marker = read_marker(path)
    return "ours" if marker is not None and marker.get("command") == command else "foreign"


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
    accepted with ``overwrite`` (it will be replaced) or ``resume`` (it will be continued).
    """
    path = _check_name(dest, flag)
    _check_against_inputs(path, inputs, flag)
    state = output_dir_state(path, command)
    if state == "foreign":
        if path.exists() and not path.is_dir():
            raise PrefnoiseError(f"{flag} {dest}: exists and is not a directory; give a new directory name")
        other = read_marker(path)
        what = (
            f"holds the output of `prefnoise {other.get('command')}`"
            if other is not None
            else "exists, is not empty and was not created by prefnoise"
        )
        raise PrefnoiseError(f"{flag} {dest}: {what}; prefnoise will not replace it, give a new directory")
    if state == "ours" and not (overwrite or resume):
        raise PrefnoiseError(
            f"{flag} {dest}: holds an earlier `prefnoise {command}` output; pass --overwrite to replace it"
            + (" or --resume to continue it" if command in ("align", "fit-reward") else "")
        )
    _check_parent(path, flag)
    return state
