"""Provenance: the history a Parquet output carries in its metadata (read back tolerantly) and the
content fingerprint of an input recorded in it."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefnoise import __version__
from prefnoise.data.locate import parquet_files
from prefnoise.data.mapping import ColumnMap, column_mapping
from prefnoise.data.schema import first_error_line
from prefnoise.errors import PrefnoiseError

if TYPE_CHECKING:
    from prefnoise.data.read import PreferenceSource

METADATA_KEY = b"prefnoise"


_FULL_HASH_LIMIT = 256 * 2**20  # files above this are fingerprinted by sampled blocks


def file_fingerprint(path: str | Path, *, files: list[Path] | None = None) -> str:
    """A content fingerprint of a file or directory of files (blake2b).

    Parquet files are fingerprinted by size and footer (the footer records every column chunk's
    offsets, compressed sizes and statistics, so content changes show), other files by their bytes
    (sampled blocks above 256 MiB). Either way a 10 GB input costs milliseconds, not a full read.
    ``files``: only these files of directory ``path`` (one split of a hub dataset, already checked).
    """
    path = Path(path)
    chosen = files is not None
    if files is None:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = (str(path.resolve()), chosen, tuple(_identity(file) for file in files))
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(key)
    if known is not None:  # each file is read once per process while it stays as it was
        return known
    fingerprint = _content_fingerprint(path, files, chosen)
    with _FINGERPRINTS_LOCK:
        while len(_FINGERPRINTS) >= _KEPT_FINGERPRINTS:
            del _FINGERPRINTS[next(iter(_FINGERPRINTS))]  # the oldest
        _FINGERPRINTS[key] = fingerprint
    return fingerprint


_FINGERPRINTS: dict[tuple[Any, ...], str] = {}
_FINGERPRINTS_LOCK = threading.Lock()
_KEPT_FINGERPRINTS = 64


def _identity(file: Path) -> tuple[Any, ...]:
    """What changes when ``file`` (or the file a link points to) is written, replaced or relinked: its name,
    the link's target, and device, inode, size and modification and change times (nanoseconds)."""
    stats = []
    for stat in (os.lstat, os.stat):
        try:
            info = stat(file)
        except OSError:
            stats.append(None)
            continue
        stats.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return (str(file), os.readlink(file) if file.is_symlink() else None, *stats)


def _content_fingerprint(path: Path, files: list[Path], chosen: bool) -> str:
    """:func:`file_fingerprint` of ``files`` (of ``path``), read from disk."""
    digest = hashlib.blake2b(digest_size=16)
    kinds = set()
    root = path.resolve() if path.is_dir() else None
    for file in files:
        if root is not None and not chosen and not file.resolve().is_relative_to(root):
            # a link out of the directory is named, never read: only the directory's own files count
            digest.update(f"{file.relative_to(path)} -> {os.readlink(file) if file.is_symlink() else '?'}".encode())
            continue
        size = file.stat().st_size
        inside = path.is_dir() and file.is_relative_to(path)
        digest.update(str(file.relative_to(path) if inside else file.name).encode())
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            footer = _parquet_footer(handle, size)
            if footer is not None:
                kinds.add("parquet-footer")
                digest.update(footer)
            elif size <= _FULL_HASH_LIMIT:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
            else:
                kinds.add("sampled")
                for offset in (0, size // 2, size - 4 * 2**20):
                    handle.seek(offset)
                    digest.update(handle.read(4 * 2**20))
    prefix = "blake2b-" + "+".join(sorted(kinds)) if kinds else "blake2b"
    return f"{prefix}:{digest.hexdigest()}"


def _parquet_footer(handle, size: int) -> bytes | None:
    """The Thrift footer of a Parquet file (between the data and the trailing length + magic), or None."""
    if size < 12:
        return None
    handle.seek(size - 8)
    tail = handle.read(8)
    if tail[4:] != b"PAR1":
        handle.seek(0)
        return None
    length = int.from_bytes(tail[:4], "little")
    if length + 8 > size:
        handle.seek(0)
        return None
    handle.seek(size - 8 - length)
    return handle.read(length)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The provenance history stored in a Parquet file written by prefnoise ([] if none or unreadable)."""
    return read_provenance(Path(path))[0]


def read_provenance(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """A Parquet file's (or shard directory's first shard's) history and, when the stored metadata
    is malformed, why it was ignored (the history is then [])."""
    path = Path(path)
    files = parquet_files(path) if path.is_dir() else [path]
    if not files:
        return [], None
    with contextlib.suppress(OSError), open(files[0], "rb") as handle:
        if handle.read(4) != b"PAR1":
            return [], None  # JSON lines, CSV and other formats carry no provenance
    try:
        metadata = pq.read_metadata(files[0]).metadata or {}
    except (pa.ArrowException, OSError) as error:
        raise PrefnoiseError(
            f"{files[0]}: cannot read as parquet ({first_error_line(error)}); check the file is complete"
        ) from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return [], None
    try:
        return _parse_provenance(raw), None
    except ValueError as error:
        return [], str(error)


def _parse_provenance(raw: bytes) -> list[dict[str, Any]]:
    """The history list from the raw ``prefnoise`` metadata value; ValueError says what is wrong."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the 'prefnoise' metadata is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"the 'prefnoise' metadata is not valid JSON ({error.msg} at char {error.pos})") from None
    except RecursionError:
        raise ValueError("the 'prefnoise' metadata is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ValueError(f"the 'prefnoise' metadata is a JSON {_json_kind(payload)}, not an object")
    history = payload.get("history", [])
    if not isinstance(history, list):
        raise ValueError(f"'history' is a JSON {_json_kind(history)}, not a list")
    expected = {"command": str, "parameters": dict, "input": dict, "time": str, "seed": int, "rows_out": int}
    for number, step in enumerate(history, 1):
        if not isinstance(step, dict):
            raise ValueError(f"history entry {number} is a JSON {_json_kind(step)}, not an object")
        for key, kind in expected.items():
            value = step.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ValueError(f"history entry {number}: {key!r} is a JSON {_json_kind(value)}")
        rows = (step.get("input") or {}).get("rows")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool)):
            raise ValueError(f"history entry {number}: 'input.rows' is a JSON {_json_kind(rows)}")
    return history


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass
class HistoryEntry:
    """One step of provenance: a command, its parameters and seed, its input and row counts."""

    command: str
    parameters: dict[str, Any]
    seed: int | None = None
    source: PreferenceSource | None = None
    started: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, rows_out: int | None = None) -> dict[str, Any]:
        """The JSON-ready record appended to a file's history."""
        record: dict[str, Any] = {
            "command": self.command,
            "parameters": self.parameters,
            "seed": self.seed,
            "time": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 3),
            "prefnoise_version": __version__,
        }
        if self.source is not None:
            record["input"] = {
                "path": self.source.name,
                "fingerprint": self.source.fingerprint,
                "rows": self.source.rows_read,
            }
            for key in ("split", "config"):
                if getattr(self.source, key, None) is not None:
                    record["input"][key] = getattr(self.source, key)
            column_map = getattr(self.source, "columns", None)
            pairs = column_mapping(column_map) if isinstance(column_map, ColumnMap) else []
            mapped = {canonical: given for canonical, given, _ in pairs if given != canonical}
            if mapped:  # which input columns (or struct paths) became the canonical ones
                record["input"]["columns"] = mapped
        if rows_out is not None:
            record["rows_out"] = rows_out
        record.update(self.extra)
        return record


def new_history_entry(
    command: str,
    parameters: dict[str, Any],
    *,
    seed: int | None = None,
    source: PreferenceSource | None = None,
) -> HistoryEntry:
    """Start a provenance record for ``command``; :func:`write_table` completes it."""
    return HistoryEntry(command=command, parameters=dict(parameters), seed=seed, source=source)
