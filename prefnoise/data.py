"""The canonical preference table: readers, validation, the atomic Parquet writer, provenance.

Every subcommand reads through :func:`open_source` and writes through :func:`write_table`, so
they share one schema (``prompt``, ``chosen``, ``rejected``, ``pair_id`` and optional columns,
see :mod:`prefnoise.columns`) and one provenance history kept in the Parquet file's metadata.
Inputs are read in record batches, so memory stays flat as files grow.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from polars.exceptions import PanicException
from polars.io.plugins import register_io_source

from prefnoise import __version__
from prefnoise import columns as C
from prefnoise.atomic import atomic_path, register_temporary
from prefnoise.errors import PrefnoiseError

METADATA_KEY = b"prefnoise"
DEFAULT_BATCH_SIZE = 16_384  # rows per record batch: ~16 MB of text at 1 KB a row keeps memory flat
LAYOUTS = ("auto", "hh")
HH_ASSISTANT = "\n\nAssistant:"
_STDIN = "-"
_FULL_HASH_LIMIT = 256 * 2**20  # files above this are fingerprinted by sampled blocks


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the prompt, the two responses and (optionally) their true scores.

    Each entry is a column name or a dotted path into struct columns (``metadata.score_chosen``);
    a column whose own name contains the dot wins over a path. A mapped column moves to its
    canonical name (``prompt``, ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``): a
    top-level column is renamed, a struct field is taken out of its struct, so no stale copy is left
    behind to disagree with the canonical column after a flip.
    """

    prompt: str = C.PROMPT
    chosen: str = C.CHOSEN
    rejected: str = C.REJECTED
    chosen_score: str | None = None
    rejected_score: str | None = None


# --------------------------------------------------------------------------- ids and hashes


def content_pair_ids(prompts: Iterable[str], chosens: Iterable[str], rejecteds: Iterable[str]) -> list[str]:
    """Stable 16-hex-digit ids: a content hash of (prompt, chosen, rejected), independent of order."""
    ids = []
    for fields in zip(prompts, chosens, rejecteds):
        digest = hashlib.blake2b(digest_size=8)
        for text in fields:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        ids.append(digest.hexdigest())
    return ids


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


# --------------------------------------------------------------------------- provenance


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The provenance history stored in a Parquet file written by prefnoise ([] if none or unreadable)."""
    return read_provenance(Path(path))[0]


def read_provenance(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """A Parquet file's (or shard directory's first shard's) history and, when the stored metadata
    is malformed, why it was ignored (the history is then [])."""
    path = Path(path)
    files = _parquet_files(path) if path.is_dir() else [path]
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


def first_error_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type name: the cause in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
            pairs = _mapping(column_map) if isinstance(column_map, ColumnMap) else []
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


# --------------------------------------------------------------------------- reading


def _parquet_files(directory: Path) -> list[Path]:
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


def _check_saved_dataset(directory: Path) -> None:
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


def _hub():
    from prefnoise import hub

    return hub


def _resolve_hub(source: str, path: Path, *, split: str | None, config: str | None) -> Any:
    """The hub split ``source`` names (a hub-layout directory, or a hub id found in the local
    caches), or None for every other source."""
    if source == _STDIN:
        return None
    if path.is_dir() and _hub().is_hub_layout(path):
        return _hub().resolve_hub_dir(path, split=split, config=config, label=source)
    if not path.exists() and not path.is_symlink() and _hub().looks_like_hub_id(source):
        return _hub().resolve_hub_id(source, split=split, config=config)
    return None


def _pick_saved_split(path: Path, split: str | None, config: str | None, name: str) -> Path:
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


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf-dataset"
        if (path / "dataset_dict.json").exists():
            raise PrefnoiseError(
                f"{path}: is a DatasetDict with several splits; pass --split NAME or one split's directory, "
                f"e.g. {path / 'train'}"
            )
        if _parquet_files(path):
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


def _spool_stdin() -> Path:
    """Copy standard input to a temporary file (Parquet needs to seek to its footer)."""
    fd, name = tempfile.mkstemp(prefix="prefnoise-stdin-")
    path = register_temporary(name)  # removed when the command ends, also on a signal
    with os.fdopen(fd, "wb") as handle:
        shutil.copyfileobj(sys.stdin.buffer, handle)
    return path


class PreferenceSource:
    """A preference dataset on disk (or stdin), read as validated canonical record batches."""

    def __init__(
        self,
        source: str | Path,
        *,
        columns: ColumnMap | None = None,
        layout: str = "auto",
        drop_invalid: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        split: str | None = None,
        config: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise PrefnoiseError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        self.name = "<stdin>" if str(source) == _STDIN else str(source)
        path = _spool_stdin() if str(source) == _STDIN else Path(source)
        self.split, self.config = split, config
        self._hub_cached: Callable[[], Any] | None = None
        hub = _resolve_hub(str(source), path, split=split, config=config)
        if hub is not None:
            path = hub.root
            self.split, self.config = hub.split, hub.config  # recorded in provenance
        elif not path.exists():
            raise PrefnoiseError(f"{self.name}: no such file or directory")
        else:
            path = _pick_saved_split(path, split, config, self.name)
        self.path = path
        self.columns = columns or ColumnMap()
        _check_column_map(self.columns)
        self.layout = layout
        self.drop_invalid = drop_invalid
        self.batch_size = batch_size
        self.rows_read = 0
        self.dropped: dict[str, int] = {}
        self._fingerprint: str | None = None
        self._schema: pl.Schema | None = None
        self._files: list[Path] = []
        self._shard_columns: list[str] | None = None
        self._multi = path.is_dir()  # errors name each file of a directory, else the source
        if isinstance(hub, _hub().HubFiles):
            self.format = hub.format
            self._files = list(hub.files)
            if self.format == "parquet":
                self._shard_columns = _check_shard_schemas(self._files)
        elif hub is not None:
            self.format = "hf-dataset"
            self._hub_cached = hub.load
        else:
            self.format = _detect_format(path)
            if self.format == "parquet":
                self._files = _parquet_files(path) if path.is_dir() else [path]
                if path.is_dir():
                    self._shard_columns = _check_shard_schemas(self._files)
            elif self.format == "hf-dataset":
                _check_saved_dataset(path)
            else:
                self._files = [path]
        # Malformed provenance never stops a command: the history restarts and history_error says why.
        self.history: list[dict[str, Any]] = []
        self.history_error: str | None = None
        if self.format == "parquet":
            self.history, self.history_error = read_provenance(self._files[0] if self._multi else path)

    # -- public -------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the input, recorded in provenance."""
        if self._fingerprint is None:
            hub_files = self._files if self.split is not None and self.format != "hf-dataset" else None
            self._fingerprint = file_fingerprint(self.path, files=hub_files)
        return self._fingerprint

    @property
    def schema(self) -> pl.Schema:
        """The canonical schema the batches will have (reads the first batch)."""
        if self._schema is None:
            first = next(self._canonical_batches(count=False), None)
            if first is None:
                if self.drop_invalid and any(batch.num_rows for batch in self._arrow_batches()):
                    raise PrefnoiseError(
                        f"{self.name}: no valid rows: --drop-invalid skipped every row; run without it to see why"
                    )
                raise PrefnoiseError(f"{self.name}: contains no rows")
            self._schema = first.schema
        return self._schema

    def batches(self) -> Iterator[pl.DataFrame]:
        """Validated canonical batches; raises PrefnoiseError naming the file and rows at fault."""
        self.rows_read = 0
        self.dropped = {}
        return self._canonical_batches(count=True)

    def collect(self) -> pl.DataFrame:
        """The whole validated table in memory."""
        frames = list(self.batches())
        if not frames:
            raise PrefnoiseError(f"{self.name}: contains no rows")
        return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]

    def scan_raw(self) -> pl.LazyFrame:
        """The file as it is (no validation; of the column map only the true-score columns, added as
        ``chosen_score``/``rejected_score``) as a LazyFrame, for long tables and column projection:
        Parquet and plain CSV stay lazy, other formats are read whole.

        Parquet is read by the same Arrow reader and checks as :meth:`batches` (each projected
        column's UTF-8 included), so polars never decodes an unchecked file. Reading errors (damaged
        pages, invalid UTF-8, unparsable CSV) surface when the frame is collected, as a
        PrefnoiseError naming the file."""
        return map_score_columns(self._scan_unmapped(), self.columns, self.name)

    def _scan_unmapped(self) -> pl.LazyFrame:
        if self.format == "parquet":
            return self._scan_parquet()
        if self.format == "csv" and self.path.suffix.lower() in (".csv", ".tsv"):
            separator = "\t" if self.path.suffix.lower() == ".tsv" else ","
            make = functools.partial(pl.scan_csv, self.path, separator=separator)
            with self._polars_errors(self.name):
                schema = make().collect_schema()

            def csv_source(
                with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
            ) -> Iterator[pl.DataFrame]:
                with self._polars_errors(self.name):
                    lazy = make().select(list(schema) if with_columns is None else with_columns)
                    lazy = lazy if predicate is None else lazy.filter(predicate)
                    lazy = lazy if n_rows is None else lazy.head(n_rows)
                    frames = iter(lazy.collect_batches(chunk_size=batch_size))
                while True:
                    with self._polars_errors(self.name):
                        frame = next(frames, None)
                    if frame is None:
                        return
                    yield frame

            return register_io_source(csv_source, schema=schema)
        batches = list(self._arrow_batches())
        if not batches:
            raise PrefnoiseError(f"{self.name}: contains no rows")
        try:
            table = pa.Table.from_batches(batches)
        except (pa.ArrowException, ValueError) as error:
            raise self._read_error(self.name, error) from None
        return _to_polars(table, self.name).lazy()

    def _scan_parquet(self) -> pl.LazyFrame:
        """A lazy scan of the Parquet file or shards through the checked Arrow reader, reading only
        the columns (and rows, with a head) the query needs."""
        first = self._files[0]
        label = str(first) if self.path.is_dir() else self.name
        try:
            arrow_schema = pq.read_schema(first)
        except (pa.ArrowException, OSError) as error:
            raise self._read_error(label, error) from None
        if self._shard_columns is not None:
            arrow_schema = pa.schema([arrow_schema.field(name) for name in self._shard_columns])
        schema = _to_polars(arrow_schema.empty_table(), label).schema

        def source(
            with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
        ) -> Iterator[pl.DataFrame]:
            names = list(schema) if with_columns is None else list(with_columns)
            remaining = n_rows
            for file in self._files:
                label = str(file) if self.path.is_dir() else self.name
                row = 0
                try:
                    parquet = pq.ParquetFile(file, pre_buffer=False)
                    batches = parquet.iter_batches(batch_size=max(batch_size or 0, 65_536), columns=names)
                    for batch in batches:
                        _check_batch(batch, label, row)
                        row += batch.num_rows
                        frame = _to_polars(batch, label)
                        wanted = pl.Schema({name: schema[name] for name in frame.columns})
                        if frame.schema != wanted:
                            frame = frame.cast(dict(wanted))
                        if predicate is not None:
                            frame = frame.filter(predicate)
                        if remaining is not None:
                            frame = frame.head(remaining)
                            remaining -= frame.height
                        yield frame
                        if remaining is not None and remaining <= 0:
                            return
                except (pa.ArrowException, OSError) as error:
                    raise self._read_error(label, error) from None

        return register_io_source(source, schema=schema)

    def total_rows(self) -> int | None:
        """Row count from file metadata when it is free to get (Parquet, saved datasets), else None."""
        if self.format == "parquet":
            total = 0
            for file in self._files:
                try:
                    total += pq.read_metadata(file).num_rows
                except (pa.ArrowException, OSError) as error:
                    raise self._read_error(str(file) if self.path.is_dir() else self.name, error) from None
            return total
        if self.format == "hf-dataset":
            return self._hf_table().num_rows
        return None

    # -- internals ----------------------------------------------------------------------

    def _read_error(self, label: str, error: BaseException) -> PrefnoiseError:
        return PrefnoiseError(
            f"{label}: cannot read as {self.format} ({first_error_line(error)}); "
            "check the file is complete and in that format"
        )

    @contextlib.contextmanager
    def _polars_errors(self, label: str) -> Iterator[None]:
        """Polars' reading errors (exceptions and Rust panics) as one PrefnoiseError naming ``label``;
        invalid UTF-8 is located (file, column, row) with the checked Arrow reader."""
        try:
            yield
        except PrefnoiseError:
            raise
        except (pl.exceptions.PolarsError, pa.ArrowException, OSError, ValueError, PanicException) as error:
            if "utf-8" in str(error).lower() or "utf8" in str(error).lower():
                for _ in self._arrow_batches():  # raises the precise invalid-UTF-8 error when it finds it
                    pass
            raise self._read_error(label, error) from None

    def _hf_table(self) -> pa.Table:
        import datasets

        if self._hub_cached is not None:
            return self._hub_cached().with_format("arrow").data.table
        try:
            dataset = datasets.load_from_disk(str(self.path))
        except Exception as error:  # datasets raises many types for unreadable directories
            raise PrefnoiseError(f"{self.name}: cannot load saved dataset ({first_error_line(error)})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise PrefnoiseError(f"{self.name}: is a DatasetDict ({', '.join(dataset)}); pass one split's directory")
        return dataset.with_format("arrow").data.table

    def _raw_batches(self) -> Iterator[tuple[str, Callable[[], Iterable[pa.RecordBatch]]]]:
        """(label, batch iterator factory) per input file; the label names the file in errors."""
        if self.format == "parquet":
            for file in self._files:
                # pre_buffer=False: the default caches read ranges and memory then grows with the file
                yield (
                    str(file) if self.path.is_dir() else self.name,
                    functools.partial(self._parquet_batches, file),
                )
        elif self.format == "json":
            options = pa_json.ReadOptions(block_size=32 * 2**20)
            for file in self._files:
                yield (
                    str(file) if self.path.is_dir() else self.name,
                    functools.partial(pa_json.open_json, pa.input_stream(str(file)), read_options=options),
                )
        elif self.format == "csv":
            options = pa_csv.ReadOptions(block_size=32 * 2**20)
            # UTF-8 is checked below (naming the row) instead of turning a bad column into binary
            convert = pa_csv.ConvertOptions(check_utf8=False)
            for file in self._files:
                parse = pa_csv.ParseOptions(delimiter="\t" if ".tsv" in file.suffixes else ",", newlines_in_values=True)
                yield str(file) if self.path.is_dir() else self.name, functools.partial(
                    pa_csv.open_csv,
                    pa.input_stream(str(file)),
                    read_options=options,
                    parse_options=parse,
                    convert_options=convert,
                )
        else:
            yield self.name, lambda: self._hf_table().to_batches(max_chunksize=self.batch_size)

    def _parquet_batches(self, file: Path) -> Iterator[pa.RecordBatch]:
        parquet = pq.ParquetFile(file, pre_buffer=False)
        yield from parquet.iter_batches(batch_size=self.batch_size, columns=self._shard_columns)

    def _arrow_batches(self) -> Iterator[pa.RecordBatch]:
        """The input's record batches, each checked before any use: every column valid (text columns,
        nested ones too, valid UTF-8), so no invalid string reaches polars or an output file."""
        for label, open_batches in self._raw_batches():
            row = 0
            try:
                for batch in open_batches():
                    _check_batch(batch, label, row)
                    row += batch.num_rows
                    yield batch
            except (pa.ArrowException, OSError) as error:
                raise self._read_error(label, error) from None

    def _canonical_batches(self, *, count: bool) -> Iterator[pl.DataFrame]:
        offset = 0
        for record_batch in self._arrow_batches():
            if record_batch.num_rows == 0:
                continue
            frame = _to_polars(record_batch, self.name)
            frame, dropped = canonicalize(
                frame,
                columns=self.columns,
                layout=self.layout,
                drop_invalid=self.drop_invalid,
                name=self.name,
                row_offset=offset,
            )
            offset += record_batch.num_rows
            if count:
                self.rows_read += record_batch.num_rows
                for reason, n in dropped.items():
                    self.dropped[reason] = self.dropped.get(reason, 0) + n
            if frame.height:
                yield frame


def _check_shard_schemas(files: list[Path]) -> list[str]:
    """Every shard of a directory must have the same columns with the same types; returns the
    first shard's column names (the order every shard is read in)."""
    first: pa.Schema | None = None
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as error:
            raise PrefnoiseError(
                f"{file}: cannot read as parquet ({first_error_line(error)}); check the file is complete"
            ) from None
        if first is None:
            first, first_file = schema, file
            continue
        a, b = {f.name: f.type for f in first}, {f.name: f.type for f in schema}
        for name in list(a) + [n for n in b if n not in a]:
            if name not in a or name not in b:
                has, lacks = (first_file, file) if name in a else (file, first_file)
                raise PrefnoiseError(
                    f"shards {first_file} and {file} differ: column {name!r} is in {has.name} but not in "
                    f"{lacks.name}; every shard needs the same columns"
                )
            if _normal_type(a[name]) != _normal_type(b[name]):
                raise PrefnoiseError(
                    f"shards {first_file} and {file} differ: column {name!r} has type {a[name]} in "
                    f"{first_file.name} but {b[name]} in {file.name}; every shard needs the same column types"
                )
    return [] if first is None else first.names


def _is_type(dtype: pa.DataType, kind: str) -> bool:
    """``pa.types.is_<kind>(dtype)``, False where this pyarrow predates the type (view types: 16)."""
    check = getattr(pa.types, f"is_{kind}", None)
    return bool(check(dtype)) if check is not None else False


def _normal_type(dtype: pa.DataType) -> str:
    """A type's spelling with Arrow's storage variants (large_, _view, dictionary) folded, as polars reads them."""
    if pa.types.is_dictionary(dtype):
        return _normal_type(dtype.value_type)
    if pa.types.is_large_string(dtype) or _is_type(dtype, "string_view"):
        return "string"
    if pa.types.is_large_binary(dtype) or _is_type(dtype, "binary_view"):
        return "binary"
    if pa.types.is_large_list(dtype) or _is_type(dtype, "list_view") or _is_type(dtype, "large_list_view"):
        return f"list<{_normal_type(dtype.value_type)}>"
    if pa.types.is_list(dtype):
        return f"list<{_normal_type(dtype.value_type)}>"
    if pa.types.is_struct(dtype):
        return "struct<" + ", ".join(f"{f.name}: {_normal_type(f.type)}" for f in dtype) + ">"
    return str(dtype)


def _check_batch(batch: pa.RecordBatch, label: str, row_offset: int) -> None:
    """PrefnoiseError for the first invalid column of ``batch``: invalid UTF-8 (naming the first
    row, 1-based, counted from ``row_offset``) or malformed Arrow data."""
    for index, field_ in enumerate(batch.schema):
        column = batch.column(index)
        try:
            column.validate(full=True)  # checks UTF-8 of every string, nested ones included
        except pa.ArrowException as error:
            bad = _first_invalid_utf8(column)
            if bad is None:
                raise PrefnoiseError(
                    f"{label}: column {field_.name!r} could not be read into a valid column "
                    f"({first_error_line(error)}); "
                    "check the file is complete and well-formed"
                ) from None
            raise PrefnoiseError(
                f"{label}: invalid UTF-8 in column {field_.name!r} at row {row_offset + bad + 1}; "
                "re-encode the file as UTF-8"
            ) from None


def _first_invalid_utf8(array: pa.Array) -> int | None:
    """Index of the first value of ``array`` holding invalid UTF-8 text (None if none is found).
    Only called once validation failed, so it may be slow."""
    try:
        bad = _invalid_utf8_mask(array)
    except (pa.ArrowException, ValueError, IndexError):  # structurally broken data: reported as malformed
        return None
    hits = np.flatnonzero(bad) if bad is not None else []
    return int(hits[0]) if len(hits) else None


def _invalid_utf8_mask(array: pa.Array) -> np.ndarray | None:
    """Per value, whether it (or a string nested in it) is invalid UTF-8; None for types not searched."""
    dtype = array.type
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or _is_type(dtype, "string_view"):
        raw = array.cast(pa.binary_view() if _is_type(dtype, "string_view") else pa.large_binary())
        return np.array([value is not None and not _is_utf8(value) for value in raw.to_pylist()], dtype=bool)
    if pa.types.is_dictionary(dtype):
        inner = _invalid_utf8_mask(array.dictionary)
        if inner is None:
            return None
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return inner[indices] & array.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        inner = _invalid_utf8_mask(pc.list_flatten(array))
        if inner is None:
            return None
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False).astype(np.int64)
        mask = np.zeros(len(array), dtype=bool)
        mask[parents[inner]] = True
        return mask
    if pa.types.is_struct(dtype):
        masks = [m for m in (_invalid_utf8_mask(child) for child in array.flatten()) if m is not None]
        return np.logical_or.reduce(masks) if masks else None
    return None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _to_polars(data: pa.RecordBatch | pa.Table, name: str) -> pl.DataFrame:
    """A validated Arrow batch or table as a polars DataFrame; conversion failures are PrefnoiseErrors."""
    seen: set[str] = set()
    for column in data.schema.names:
        if column in seen:
            raise PrefnoiseError(f"{name}: column name {column!r} appears twice; rename one of them")
        seen.add(column)
    # polars parses schema and field metadata (a panic when it is not UTF-8); none of it is needed here
    data = data.replace_schema_metadata(None)
    if any(f.metadata for f in data.schema):
        clean = pa.schema([f.remove_metadata() for f in data.schema])
        data = type(data).from_arrays(data.columns, schema=clean)
    try:
        frame = pl.from_arrow(data)
    except (pl.exceptions.PolarsError, pa.ArrowException, ValueError, TypeError, PanicException) as error:
        raise PrefnoiseError(f"{name}: cannot convert the columns to a table ({first_error_line(error)})") from None
    assert isinstance(frame, pl.DataFrame)
    return frame


def open_source(
    source: str | Path,
    *,
    columns: ColumnMap | None = None,
    layout: str = "auto",
    drop_invalid: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    split: str | None = None,
    config: str | None = None,
) -> PreferenceSource:
    """Open a Parquet file or shard directory, JSONL(.gz), CSV, saved dataset, hub-layout directory,
    hub dataset id found in the local Hugging Face caches (``split``/``config`` pick one part of
    those; offline, :mod:`prefnoise.hub`), or ``-`` (stdin)."""
    return PreferenceSource(
        source,
        columns=columns,
        layout=layout,
        drop_invalid=drop_invalid,
        batch_size=batch_size,
        split=split,
        config=config,
    )


def read_table(source: str | Path, **options: Any) -> pl.DataFrame:
    """Read a whole preference table into memory, validated and canonical."""
    return open_source(source, **options).collect()


# --------------------------------------------------------------------------- canonical form


def canonicalize(
    frame: pl.DataFrame,
    *,
    columns: ColumnMap | None = None,
    layout: str = "auto",
    drop_invalid: bool = False,
    name: str = "<table>",
    row_offset: int = 0,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Map, split and validate one batch into the canonical schema; return it and drop counts."""
    columns = columns or ColumnMap()
    reserved = [c for c in frame.columns if c.startswith("__")]  # internal names; never written (pandas' index too)
    frame = frame.drop(reserved) if reserved else frame
    frame = _apply_column_map(frame, columns, name)
    frame = frame.with_row_index("__row", offset=row_offset + 1)
    invalid: dict[str, pl.Expr] = {}
    if _is_conversational(frame, name):
        frame, broken, mismatch = _from_conversational(frame, name)
        invalid["a message without role or content"] = broken
        invalid["conversation prefixes differ"] = mismatch
    elif layout == "hh":
        frame, mismatch = _split_shared_prefix(frame, name)
        invalid["transcript prefixes differ"] = mismatch
    _check_required(frame, name, columns)
    frame = _coerce_types(frame, name)
    if C.PAIR_ID not in frame.columns:
        ids = content_pair_ids(
            frame[C.PROMPT].fill_null(""), frame[C.CHOSEN].fill_null(""), frame[C.REJECTED].fill_null("")
        )
        frame = frame.with_columns(pl.Series(C.PAIR_ID, ids, dtype=pl.String))
    for column in C.REQUIRED:
        text = pl.col(column)
        invalid[f"null or empty '{column}'"] = text.is_null() | (text.str.strip_chars() == "")
    invalid["'chosen' equals 'rejected'"] = pl.col(C.CHOSEN) == pl.col(C.REJECTED)
    invalid["null 'pair_id'"] = pl.col(C.PAIR_ID).is_null()
    dropped: dict[str, int] = {}
    flags = frame.select(**{reason: expr.fill_null(False) for reason, expr in invalid.items()})
    bad_any = pl.Series("bad", [False] * frame.height)
    for reason in flags.columns:
        mask = flags[reason] & ~bad_any  # count each row once, under its first reason
        n_bad = int(mask.sum())
        if n_bad == 0:
            continue
        if not drop_invalid:
            rows = frame.filter(mask).head(3)
            where = ", ".join(f"row {r} (pair_id {p})" for r, p in zip(rows["__row"], rows[C.PAIR_ID]))
            raise PrefnoiseError(
                f"{name}: {n_bad} row(s) with {reason}, first at {where}; fix them or pass "
                "--drop-invalid to skip such rows"
            )
        dropped[reason] = n_bad
        bad_any = bad_any | mask
    if dropped:
        frame = frame.filter(~bad_any)
    return _order_columns(_drop_internal(frame)), dropped


def _check_column_map(columns: ColumnMap) -> None:
    """The true-score options go together."""
    if (columns.chosen_score is None) != (columns.rejected_score is None):
        given = "--chosen-score-col" if columns.chosen_score is not None else "--rejected-score-col"
        raise PrefnoiseError(
            f"{given} needs its partner: give both --chosen-score-col and --rejected-score-col (one score per response)"
        )


def _mapping(columns: ColumnMap) -> list[tuple[str, str, str]]:
    """(canonical column, given column or path, option) for every mapped column."""
    pairs = [
        (C.PROMPT, columns.prompt, "--prompt-col"),
        (C.CHOSEN, columns.chosen, "--chosen-col"),
        (C.REJECTED, columns.rejected, "--rejected-col"),
    ]
    if columns.chosen_score is not None and columns.rejected_score is not None:
        pairs.append((C.chosen(C.SCORE), columns.chosen_score, "--chosen-score-col"))
        pairs.append((C.rejected(C.SCORE), columns.rejected_score, "--rejected-score-col"))
    return pairs


def resolve_path(schema: pl.Schema | dict[str, pl.DataType], path: str, *, what: str) -> list[str]:
    """The parts of column or dotted ``path`` (``metadata.score_chosen``): a top-level column, then
    struct fields. A column whose own name contains dots wins; a name is matched longest first.
    PrefnoiseError, in one line naming ``what`` asked for it, when a part is missing or its parent
    is not a struct."""
    if path in schema:
        return [path]
    if not path or "." not in path:
        raise PrefnoiseError(f"no column {path!r} ({what}); columns are: {', '.join(_visible(schema))}")
    names: dict[str, pl.DataType] = dict(schema)
    parts: list[str] = []
    rest = path
    where = "columns"
    while rest:
        match = next((n for n in sorted(names, key=len, reverse=True) if rest == n or rest.startswith(n + ".")), None)
        if match is None:
            field_name = rest.split(".", 1)[0]
            inside = f"struct {'.'.join(parts)!r} has no field" if parts else "no column"
            raise PrefnoiseError(
                f"{inside} {field_name!r} (path {path!r}, {what}); {where} are: {', '.join(_visible(names))}"
            )
        parts.append(match)
        rest = rest[len(match) + 1 :]
        dtype = names[match]
        if not rest:
            break
        if not isinstance(dtype, pl.Struct):
            kind = "a list" if isinstance(dtype, pl.List | pl.Array) else f"of type {dtype}"
            raise PrefnoiseError(
                f"{'.'.join(parts)!r} is {kind}, not a struct, so it has no field {rest.split('.', 1)[0]!r} "
                f"(path {path!r}, {what})"
            )
        names = {f.name: f.dtype for f in dtype.fields}
        where = f"fields of {'.'.join(parts)!r}"
    return parts


def _visible(names: Any) -> list[str]:
    return [n for n in names if not str(n).startswith("__")]


def path_expr(parts: list[str]) -> pl.Expr:
    """The polars expression reading the column or nested struct field ``parts``."""
    expr = pl.col(parts[0])
    for part in parts[1:]:
        expr = expr.struct.field(part)
    return expr


def path_dtype(schema: pl.Schema | dict[str, pl.DataType], parts: list[str]) -> pl.DataType:
    """The type of the column or nested struct field ``parts``."""
    dtype = schema[parts[0]]
    for part in parts[1:]:
        dtype = {f.name: f.dtype for f in dtype.fields}[part]  # type: ignore[attr-defined]
    return dtype


def _without_field(expr: pl.Expr, dtype: pl.DataType, parts: list[str]) -> pl.Expr | None:
    """Struct ``expr`` without its nested field ``parts`` (None when nothing would be left); a null
    struct stays null."""
    fields = []
    for field_ in dtype.fields:  # type: ignore[attr-defined]
        value = expr.struct.field(field_.name)
        if field_.name == parts[0]:
            if len(parts) == 1:
                continue
            value = _without_field(value, field_.dtype, parts[1:])
            if value is None:
                continue
        fields.append(value.alias(field_.name))
    if not fields:
        return None
    return pl.when(expr.is_null()).then(None).otherwise(pl.struct(fields))


def map_score_columns(lazy: pl.LazyFrame, columns: ColumnMap, name: str) -> pl.LazyFrame:
    """``lazy`` with the true-score columns of ``columns`` (columns or dotted paths) added as
    ``chosen_score``/``rejected_score``, for readers of the raw table (``rank-check``); the
    sources stay in place."""
    mapping = [m for m in _mapping(columns)[3:] if m[1] != m[0]]
    if not mapping:
        return lazy
    schema = lazy.collect_schema()
    given_names = {given for _, given, _ in mapping}
    exprs = []
    for canonical, given, flag in mapping:
        try:
            parts = resolve_path(schema, given, what=f"asked for by {flag}")
        except PrefnoiseError as error:
            raise PrefnoiseError(f"{name}: {error.message}") from None
        _check_score_source(schema, parts, canonical, given, flag, given_names, name)
        exprs.append(path_expr(parts).alias(canonical))
    return lazy.with_columns(exprs)


def _check_score_source(
    schema: Any, parts: list[str], canonical: str, given: str, flag: str, given_names: set[str], name: str
) -> None:
    """A true-score source must be numeric and must not silently replace an existing score column."""
    dtype = path_dtype(schema, parts)
    if not (dtype.is_numeric() or dtype == pl.Null):
        raise PrefnoiseError(f"{name}: {flag} {given}: has type {dtype}; true scores must be numbers (int or float)")
    if canonical in schema and canonical not in given_names:
        raise PrefnoiseError(
            f"{name}: column {canonical!r} exists already and {flag} {given} would replace it; "
            f"drop {flag} to use the existing column, or rename that column"
        )


def _apply_column_map(frame: pl.DataFrame, columns: ColumnMap, name: str) -> pl.DataFrame:
    """Move every mapped column (a top-level column or a dotted path into structs) to its canonical name."""
    mapping = [(canonical, given, flag) for canonical, given, flag in _mapping(columns) if given != canonical]
    if not mapping:
        return frame
    given_names = {given for _, given, _ in _mapping(columns)}
    resolved: list[tuple[str, list[str]]] = []
    for canonical, given, flag in mapping:
        try:
            parts = resolve_path(frame.schema, given, what=f"asked for by {flag}")
        except PrefnoiseError as error:
            raise PrefnoiseError(f"{name}: {error.message}") from None
        if canonical in (C.chosen(C.SCORE), C.rejected(C.SCORE)):
            _check_score_source(frame.schema, parts, canonical, given, flag, given_names, name)
        resolved.append((canonical, parts))
    # read every value before anything is renamed or taken apart
    nested = [(canonical, parts) for canonical, parts in resolved if len(parts) > 1]
    values = frame.select([path_expr(parts).alias(canonical) for canonical, parts in nested]) if nested else None
    for column in dict.fromkeys(parts[0] for _, parts in nested):
        for _, parts in nested:
            if parts[0] != column or column not in frame.columns:
                continue
            remaining = _without_field(pl.col(column), frame.schema[column], parts[1:])
            frame = frame.drop(column) if remaining is None else frame.with_columns(remaining.alias(column))
    renames = {parts[0]: canonical for canonical, parts in resolved if len(parts) == 1}
    for canonical, _ in resolved:
        if canonical in frame.columns and canonical not in renames:
            frame = frame.rename({canonical: f"original_{canonical}"})
    frame = frame.rename(renames) if renames else frame
    return frame.with_columns(values) if values is not None else frame


def _check_required(frame: pl.DataFrame, name: str, columns: ColumnMap) -> None:
    missing = [c for c in C.REQUIRED if c not in frame.columns]
    if not missing:
        return
    hint = "map yours with --prompt-col/--chosen-col/--rejected-col"
    if missing == [C.PROMPT] and C.CHOSEN in frame.columns:
        sample = frame[C.CHOSEN].head(5)
        if sample.dtype == pl.String and sample.str.contains(HH_ASSISTANT, literal=True).any():
            hint = "chosen/rejected look like full transcripts: split them with --layout hh"
    raise PrefnoiseError(
        f"{name}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
        f"columns are: {', '.join(c for c in frame.columns if c != '__row')}; {hint}"
    )


def _coerce_types(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    casts = []
    for column in C.REQUIRED:
        dtype = frame.schema[column]
        if dtype == pl.String:
            continue
        if dtype in (pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum):
            casts.append(pl.col(column).cast(pl.String))
        else:
            raise PrefnoiseError(f"{name}: column {column!r} has type {dtype}; expected text (strings)")
    if C.PAIR_ID in frame.columns and frame.schema[C.PAIR_ID] != pl.String:
        dtype = frame.schema[C.PAIR_ID]
        if not (dtype.is_integer() or dtype in (pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)):
            raise PrefnoiseError(
                f"{name}: column 'pair_id' has type {dtype}; expected text or integer ids "
                "(or drop the column and prefnoise computes content ids)"
            )
        casts.append(pl.col(C.PAIR_ID).cast(pl.String))
    if C.FLIPPED in frame.columns and frame.schema[C.FLIPPED] != pl.Boolean:
        if not frame.schema[C.FLIPPED].is_integer():
            raise PrefnoiseError(f"{name}: column 'flipped' has type {frame.schema[C.FLIPPED]}; expected booleans")
        casts.append(pl.col(C.FLIPPED).cast(pl.Boolean))
    return frame.with_columns(casts) if casts else frame


def _order_columns(frame: pl.DataFrame) -> pl.DataFrame:
    first = [C.PAIR_ID, *C.REQUIRED]
    return frame.select(first + [c for c in frame.columns if c not in first])


def _split_shared_prefix(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr]:
    """Anthropic HH layout, split as TRL's ``extract_prompt`` does, at a turn boundary.

    The prompt is the longest common prefix of the two transcripts, cut back to its last
    '\\n\\nAssistant:' (which the prompt keeps); each response is the rest of its transcript,
    leading space included, so ``prompt + chosen`` and ``prompt + rejected`` rebuild the originals
    byte for byte. TRL's ``extract_prompt`` takes the character-level common prefix, which on raw
    HH strings can end inside the final reply (both replies start "I ..."); cutting it back to the
    last assistant marker gives the same prompt whenever TRL's ends at one. Transcripts whose final
    turns differ in number (one reply continues the dialogue) keep the shared turns as the prompt,
    as TRL does; only pairs with no common prefix ending in '\\n\\nAssistant:' are invalid.
    """
    if C.PROMPT in frame.columns:
        raise PrefnoiseError(f"{name}: --layout hh expects no 'prompt' column, but one exists")
    for column in (C.CHOSEN, C.REJECTED):
        if column not in frame.columns or frame.schema[column] != pl.String:
            raise PrefnoiseError(f"{name}: --layout hh needs text columns 'chosen' and 'rejected'")
    prompts, chosens, rejecteds = [], [], []
    for chosen, rejected in zip(frame[C.CHOSEN].to_list(), frame[C.REJECTED].to_list()):
        cut = hh_prompt_length(chosen, rejected)
        if cut is None:
            prompts.append(None)
            chosens.append(chosen)
            rejecteds.append(rejected)
        else:
            prompts.append(chosen[:cut])
            chosens.append(chosen[cut:])
            rejecteds.append(rejected[cut:])
    frame = frame.with_columns(
        pl.Series(C.PROMPT, prompts, dtype=pl.String),
        pl.Series(C.CHOSEN, chosens, dtype=pl.String),
        pl.Series(C.REJECTED, rejecteds, dtype=pl.String),
    )
    frame = frame.with_columns(pl.col(C.PROMPT).is_null().alias("__mismatch"))
    return frame, pl.col("__mismatch")


def hh_prompt_length(chosen: str | None, rejected: str | None) -> int | None:
    """Length of the HH prompt of a transcript pair: their longest common prefix cut back to the end
    of its last '\\n\\nAssistant:'; None when either is null or the common prefix has none."""
    if chosen is None or rejected is None:
        return None
    # fast path: one transcript's last-assistant prefix is a prefix of the other
    for first, second in ((chosen, rejected), (rejected, chosen)):
        at = first.rfind(HH_ASSISTANT)
        if at >= 0 and second.startswith(first[: at + len(HH_ASSISTANT)]):
            return at + len(HH_ASSISTANT)
    common = os.path.commonprefix([chosen, rejected])
    at = common.rfind(HH_ASSISTANT)
    return at + len(HH_ASSISTANT) if at >= 0 else None


def _is_messages(dtype: pl.DataType | None) -> bool:
    return isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)


def _is_conversational(frame: pl.DataFrame, name: str = "<table>") -> bool:
    """Whether the batch is in TRL's conversational format; PrefnoiseError when it mixes messages
    (lists of {role, content}) with plain text, or its messages are not text."""
    kinds = {c: frame.schema[c] for c in C.REQUIRED if c in frame.columns}
    holding = [c for c, dtype in kinds.items() if _is_messages(dtype)]
    if not holding or C.CHOSEN not in kinds or C.REJECTED not in kinds:
        return False  # a missing column is reported by _check_required
    if any(not _is_messages(dtype) and dtype != pl.Null for dtype in kinds.values()):
        described = "; ".join(
            f"{c!r} holds {'messages' if c in holding else 'plain text' if kinds[c] == pl.String else kinds[c]}"
            for c in kinds
        )
        raise PrefnoiseError(
            f"{name}: columns mix conversational messages (lists of {{role, content}}) with other values "
            f"({described}); give 'chosen' and 'rejected' (and 'prompt', if present) all as messages or all as text"
        )
    for column in holding:
        fields = {f.name: f.dtype for f in kinds[column].inner.fields}  # type: ignore[union-attr]
        for key in ("role", "content"):
            if key in fields and fields[key] not in (pl.String, pl.Null):
                raise PrefnoiseError(
                    f"{name}: messages in column {column!r} have {key!r} of type {fields[key]}; expected text "
                    "(multimodal or structured content is not supported; flatten it to a string)"
                )
    return True


def _render_messages(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"{m.get('role') or ''}: {m.get('content') or ''}" for m in messages)


def _response_text(messages: list[dict[str, Any]]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return _render_messages(messages)


def _broken_messages(*lists: list[Any]) -> bool:
    """Whether any message is null or lacks its role or content."""
    return any(m is None or m.get("role") is None or m.get("content") is None for msgs in lists for m in msgs)


def _from_conversational(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr, pl.Expr]:
    """TRL's conversational format: lists of {role, content}, explicit or implicit prompt.

    The text columns hold the rendered prompt and the response text; the messages themselves are
    kept losslessly as JSON in ``prompt_messages``, ``chosen_messages`` and ``rejected_messages``
    (the latter two swap with their response on a flip), from which :func:`write_table` writes the
    table back in TRL's explicit-prompt conversational format.
    Returns the frame and the masks of rows with a broken message and with differing prefixes."""
    chosen_lists = frame[C.CHOSEN].to_list()
    rejected_lists = frame[C.REJECTED].to_list()
    explicit = C.PROMPT in frame.columns and _is_messages(frame.schema[C.PROMPT])
    prompt_lists = frame[C.PROMPT].to_list() if explicit else [None] * frame.height
    prompts, prompt_json, chosen, rejected, mismatch, broken = [], [], [], [], [], []
    chosen_json, rejected_json = [], []
    for prompt, chosen_msgs, rejected_msgs in zip(prompt_lists, chosen_lists, rejected_lists):
        chosen_msgs, rejected_msgs = chosen_msgs or [], rejected_msgs or []
        bad = _broken_messages(prompt or [], chosen_msgs, rejected_msgs)
        broken.append(bad)
        if bad:
            chosen_msgs, rejected_msgs, prompt = [m for m in chosen_msgs if m], [m for m in rejected_msgs if m], []
        if prompt is None:
            prompt = chosen_msgs[:-1]
            differs = prompt != rejected_msgs[:-1]
            chosen_msgs, rejected_msgs = chosen_msgs[-1:], rejected_msgs[-1:]
        else:
            differs = False
        mismatch.append(differs)
        prompts.append(_render_messages(prompt))
        prompt_json.append(json.dumps(prompt, ensure_ascii=False, default=str))
        chosen.append(_response_text(chosen_msgs))
        rejected.append(_response_text(rejected_msgs))
        chosen_json.append(json.dumps(chosen_msgs, ensure_ascii=False, default=str))
        rejected_json.append(json.dumps(rejected_msgs, ensure_ascii=False, default=str))
    frame = frame.with_columns(
        pl.Series(C.PROMPT, prompts, dtype=pl.String),
        pl.Series(C.PROMPT_MESSAGES, prompt_json, dtype=pl.String),
        pl.Series(C.chosen(C.MESSAGES), chosen_json, dtype=pl.String),
        pl.Series(C.rejected(C.MESSAGES), rejected_json, dtype=pl.String),
        pl.Series(C.CHOSEN, chosen, dtype=pl.String),
        pl.Series(C.REJECTED, rejected, dtype=pl.String),
        pl.Series("__broken", broken, dtype=pl.Boolean),
        pl.Series("__mismatch", mismatch, dtype=pl.Boolean),
    )
    return frame, pl.col("__broken"), pl.col("__mismatch")


# --------------------------------------------------------------------------- writing


def write_table(
    data: pl.DataFrame | Iterable[pl.DataFrame],
    dest: str | Path,
    *,
    entry: HistoryEntry | dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    row_group_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
) -> int:
    """Write frames atomically (``-``: Parquet on stdout) with history; return rows written.

    OUT's extension picks the format (:func:`output_format`): ``.parquet``/``.pq`` or none writes
    zstd Parquet carrying the provenance history in its metadata; ``.jsonl`` writes JSON lines and
    ``.csv`` CSV, which carry no provenance (``history`` and ``entry`` are then not stored). CSV
    holds flat values only: a struct or list column is refused, naming it (write .jsonl or .parquet).

    A conversational table (one carrying ``prompt_messages``, ``chosen_messages`` and
    ``rejected_messages``) is written back in TRL's conversational format: ``prompt``, ``chosen``
    and ``rejected`` as lists of {role, content} messages (explicit prompt), without the JSON
    helper columns; reading it back gives the same canonical table.

    ``history`` defaults to the entry's source history; ``entry`` is appended to it. An existing
    ``dest`` is replaced only with ``overwrite`` and only when prefnoise wrote it; ``dest`` may never
    be the entry's input (:mod:`prefnoise.outputs`).
    """
    from prefnoise.outputs import check_output_file

    source_path = entry.source.path if isinstance(entry, HistoryEntry) and entry.source is not None else None
    check_output_file(dest, inputs=[source_path], overwrite=overwrite)
    kind = output_format(dest)
    frames = [data] if isinstance(data, pl.DataFrame) else data
    if kind != "parquet":
        return _write_text_table(frames, Path(dest), kind)
    if history is None:
        source = entry.source if isinstance(entry, HistoryEntry) else None
        history = list(source.history) if source is not None else []
    to_stdout = str(dest) == _STDIN
    target = Path(tempfile.mkdtemp(prefix="prefnoise-out-")) / "out.parquet" if to_stdout else Path(dest)
    rows = 0
    try:
        with atomic_path(target) as tmp:
            writer: _BackgroundWriter | None = None
            message_types: dict[str, pa.DataType] = {}
            try:
                for frame in frames:
                    table = _to_conversational(_drop_internal(frame).to_arrow(), message_types)
                    if writer is None:
                        writer = _BackgroundWriter(tmp, table.schema, row_group_size)
                    writer.put(table)
                    rows += table.num_rows
                if writer is None:
                    raise PrefnoiseError("no rows to write: every input row was filtered out")
                record = entry.to_dict(rows_out=rows) if isinstance(entry, HistoryEntry) else entry
                full_history = history + ([record] if record else [])
                payload = {"format": 1, "prefnoise_version": __version__, "history": full_history}
                writer.finish({METADATA_KEY: json.dumps(payload, default=str)})
            finally:
                if writer is not None:
                    writer.close()
        if to_stdout:
            try:
                with open(target, "rb") as handle:
                    shutil.copyfileobj(handle, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                raise
            except OSError as error:
                if error.filename is not None:
                    raise
                raise PrefnoiseError(f"cannot write to standard output: {error.strerror or error}") from None
    finally:
        if to_stdout:
            shutil.rmtree(target.parent, ignore_errors=True)
    return rows


OUTPUT_FORMATS = {"": "parquet", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".csv": "csv"}


def output_format(dest: str | Path) -> str:
    """The table format OUT's extension asks for: parquet (``.parquet``, ``.pq``, none, or ``-``),
    jsonl or csv; a PrefnoiseError for any other extension (so ``out.json`` never receives Parquet)."""
    if str(dest) == _STDIN:
        return "parquet"
    suffix = Path(dest).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise PrefnoiseError(
            f"OUT {dest}: unknown table format {suffix!r}; name the file *.parquet (with provenance), "
            "*.jsonl or *.csv"
        )
    return OUTPUT_FORMATS[suffix]


def _write_text_table(frames: Iterable[pl.DataFrame], dest: Path, kind: str) -> int:
    """Write frames atomically as JSON lines or CSV (header once); return rows written."""
    import io

    rows = 0
    header = True
    message_types: dict[str, pa.DataType] = {}
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        for frame in frames:
            table = _to_conversational(_drop_internal(frame).to_arrow(), message_types)
            out = _to_polars(table, str(dest))
            buffer = io.BytesIO()
            try:
                if kind == "csv":
                    nested = [c for c, t in out.schema.items() if t.is_nested() or t == pl.Binary]
                    if nested:
                        raise PrefnoiseError(
                            f"OUT {dest}: column {nested[0]!r} holds {out.schema[nested[0]]} values, which CSV "
                            "cannot hold; write *.jsonl or *.parquet, or drop the column first"
                        )
                    out.write_csv(buffer, include_header=header)
                    header = False
                else:
                    out.write_ndjson(buffer)
            except (pl.exceptions.PolarsError, PanicException) as error:
                raise PrefnoiseError(f"OUT {dest}: cannot write as {kind} ({first_error_line(error)})") from None
            handle.write(buffer.getvalue())
            rows += out.height
        if rows == 0:
            raise PrefnoiseError("no rows to write: every input row was filtered out")
    return rows


_MESSAGE_COLUMNS = (
    (C.PROMPT_MESSAGES, C.PROMPT),
    (C.chosen(C.MESSAGES), C.CHOSEN),
    (C.rejected(C.MESSAGES), C.REJECTED),
)


def _to_conversational(table: pa.Table, message_types: dict[str, pa.DataType]) -> pa.Table:
    """``table`` with its JSON message columns turned back into TRL's conversational columns
    (``prompt``, ``chosen``, ``rejected`` as lists of message structs) and dropped; unchanged when
    it lacks any of them. ``message_types`` holds each column's list type, fixed by the first batch
    so every batch of one file gets the same schema."""
    names = table.column_names
    if not all(helper in names for helper, _ in _MESSAGE_COLUMNS):
        return table
    for helper, column in _MESSAGE_COLUMNS:
        values = [None if raw is None else json.loads(raw) for raw in table.column(helper).to_pylist()]
        if column not in message_types:
            message_types[column] = _message_list_type(values)
        target = message_types[column]
        known = {f.name for f in target.value_type}
        extra = {k for msgs in values for m in msgs or [] if isinstance(m, dict) for k in m} - known
        if extra:
            raise PrefnoiseError(
                f"messages in {column!r} gain field(s) {', '.join(sorted(map(repr, extra)))} part-way "
                "through the table; give every message the same fields"
            )
        try:
            array = pa.array(values, type=target)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise PrefnoiseError(f"cannot write the {column!r} messages: {first_error_line(error)}") from None
        table = table.set_column(table.column_names.index(column), column, array)
    return table.drop_columns([helper for helper, _ in _MESSAGE_COLUMNS])


def _message_list_type(values: list[Any]) -> pa.DataType:
    """The list-of-struct type of messages ``values``: their fields in first-seen order (role and
    content always, as text), other fields typed from their values (text when all null)."""
    text = ("role", "content")
    keys: list[str] = []
    for msgs in values:
        for message in msgs or []:
            for key in message if isinstance(message, dict) else ():
                if key not in keys:
                    keys.append(key)
    keys += [k for k in text if k not in keys]
    fields = []
    for key in keys:
        if key in text:
            fields.append(pa.field(key, pa.string()))
            continue
        items = [m.get(key) for msgs in values for m in msgs or [] if isinstance(m, dict)]
        inferred = pa.array(items).type
        fields.append(pa.field(key, pa.string() if pa.types.is_null(inferred) else inferred))
    return pa.list_(pa.struct(fields))


class _BackgroundWriter:
    """A ParquetWriter fed through a small queue by a thread of its own.

    Encoding and compressing a row group (pyarrow, GIL released) then overlaps with reading and
    transforming the next batch; the queue bound keeps at most two batches in flight.
    """

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.row_group_size = row_group_size
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="prefnoise-parquet-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (table := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_table(table, row_group_size=self.row_group_size)
                except BaseException as error:  # re-raised in the caller's thread
                    self.error = error

    def put(self, table: pa.Table) -> None:
        """Queue one table (cast to the file's schema) for writing; re-raise a writer failure."""
        if self.error is not None:
            raise self.error
        self.queue.put(table if table.schema == self.schema else table.cast(self.schema))

    def finish(self, metadata: dict[bytes, str]) -> None:
        """Wait for every queued table, then add the key-value metadata."""
        self._join()
        if self.error is not None:
            raise self.error
        self.writer.add_key_value_metadata(metadata)

    def close(self) -> None:
        """Stop the thread (if still running) and close the file."""
        self._join()
        self.writer.close()

    def _join(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def _drop_internal(frame: pl.DataFrame) -> pl.DataFrame:
    internal = [c for c in frame.columns if c.startswith("__")]
    return frame.drop(internal) if internal else frame
