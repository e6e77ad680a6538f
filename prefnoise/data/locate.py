"""What a source names and holds: its format (Parquet, JSON lines, CSV, a saved dataset, a hub
layout or id), its Parquet shards and saved-dataset files (never outside its directory), the split
asked for, and stdin spooled to a file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from prefnoise import hub as hubs
from prefnoise.atomic import register_temporary
from prefnoise.data.schema import STDIN, first_error_line
from prefnoise.errors import PrefnoiseError


def parquet_files(directory: Path) -> list[Path]:
    """The *.parquet shards under ``directory``; a shard that resolves (after symlinks) outside it is an error."""
    files = sorted(p for p in directory.rglob("*.parquet") if p.is_file())
    root = directory.resolve()
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise PrefnoiseError(
                f"{directory}: shard entry {file.relative_to(directory)} links to {file.resolve()}, outside the "
                "directory; copy the file into the directory or remove the link"
            )
    return files


def check_saved_dataset(directory: Path) -> None:
    """A saved dataset may only name data files inside its directory (state.json's ``_data_files``)."""
    root = directory.resolve()
    for meta in ("state.json", "dataset_info.json"):
        if (directory / meta).exists() and not (directory / meta).resolve().is_relative_to(root):
            raise PrefnoiseError(f"{directory}: {meta} links outside the directory; copy the file in instead")
    state_path = directory / "state.json"
    if not state_path.is_file():
        return  # datasets reports the missing file
    fix = "re-save the dataset with save_to_disk"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PrefnoiseError(f"{state_path}: unreadable ({first_error_line(error)}); {fix}") from None
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("filename"), str) and e["filename"] for e in entries
    ):
        raise PrefnoiseError(f"{state_path}: '_data_files' is not a list of {{\"filename\": NAME}} entries; {fix}")
    for entry in entries:
        name = entry["filename"]
        parts = name.replace("\\", "/").split("/")
        if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\x00" in name:
            raise PrefnoiseError(
                f"{state_path}: data file name {name!r} is absolute or climbs out with '..'; a saved dataset "
                f"names files inside its directory only; {fix}"
            )
        if not (directory / name).resolve().is_relative_to(root):
            raise PrefnoiseError(
                f"{state_path}: data file {name!r} resolves to {(directory / name).resolve()}, outside the "
                "directory; copy the file into the directory or remove the link"
            )


def resolve_hub(source: str, path: Path, *, split: str | None, config: str | None) -> Any:
    """The hub split ``source`` names (a hub-layout directory, or a hub id found in the local
    caches), or None for every other source."""
    if source == STDIN:
        return None
    if path.is_dir() and hubs.is_hub_layout(path):
        return hubs.resolve_hub_dir(path, split=split, config=config, label=source)
    if not path.exists() and not path.is_symlink() and hubs.looks_like_hub_id(source):
        return hubs.resolve_hub_id(source, split=split, config=config)
    return None


def pick_saved_split(path: Path, split: str | None, config: str | None, name: str) -> Path:
    """``path`` itself, or with ``--split`` one split's directory of a saved DatasetDict; ``--split``
    and ``--config`` are refused for sources that have neither."""
    where = "hub datasets, hub-layout directories"
    if config is not None:
        raise PrefnoiseError(f"{name}: --config applies to {where} only; drop it")
    if split is None:
        return path
    if path.is_dir() and (path / "dataset_dict.json").exists():
        if not (path / split / "dataset_info.json").exists() and not (path / split / "state.json").exists():
            names = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
            raise PrefnoiseError(f"{name}: no split {split!r}; splits are: {', '.join(names) or 'none'}")
        if not (path / split).resolve().is_relative_to(path.resolve()):
            raise PrefnoiseError(f"{name}: split directory {split!r} links outside the dataset; copy it in instead")
        return path / split
    raise PrefnoiseError(f"{name}: --split applies to {where} and saved DatasetDicts only; drop it")


def detect_format(path: Path) -> str:
    """The format of ``path``: parquet, json, csv or hf-dataset (a saved dataset directory), from its
    extension or, without one, its first bytes; a PrefnoiseError for an unreadable directory."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf-dataset"
        if (path / "dataset_dict.json").exists():
            raise PrefnoiseError(
                f"{path}: is a DatasetDict with several splits; pass --split NAME or one split's directory, "
                f"e.g. {path / 'train'}"
            )
        if parquet_files(path):
            return "parquet"
        raise PrefnoiseError(f"{path}: directory holds no .parquet shards and no saved dataset")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst", ".bz2"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".jsonl", ".ndjson", ".json"):
        return "json"
    if last in (".csv", ".tsv"):
        return "csv"
    return _sniff_format(path)


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "json"
    if head[:1] in (b"{", b"["):
        return "json"
    if head:
        return "csv"
    raise PrefnoiseError(f"{path}: file is empty; expected Parquet, JSONL or CSV rows")


def spool_stdin() -> Path:
    """Copy standard input to a temporary file (Parquet needs to seek to its footer)."""
    return _spool(sys.stdin.buffer, prefix="prefnoise-stdin-", suffix="")


def open_stream_input(path: Path, name: str) -> Path:
    """``path`` itself, or when it is a FIFO or socket (readable once, front to back, never seekable)
    a temporary copy read from it once as a stream, keeping its table suffixes (``.jsonl.gz``) so the
    format is known; readers then seek (Parquet's footer) and read it more than once. A device is
    refused: it may never end."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # missing or unreadable: reported where the source is opened
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise PrefnoiseError(f"{name}: is a device, not a table file; pass a file, a FIFO, or - for stdin")
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return path
    suffix = "".join(s for s in path.suffixes if s.lower() in _TABLE_SUFFIXES)
    with open(path, "rb") as stream:
        return _spool(stream, prefix="prefnoise-stream-", suffix=suffix)


_TABLE_SUFFIXES = {".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".gz", ".zst", ".bz2"}


def _spool(stream: BinaryIO, *, prefix: str, suffix: str) -> Path:
    """Copy ``stream`` to a temporary file, removed when the command ends (also on a signal)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    path = register_temporary(name)
    with os.fdopen(fd, "wb") as handle:
        shutil.copyfileobj(stream, handle)
    return path
