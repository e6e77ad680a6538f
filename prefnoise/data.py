"""The canonical preference table: readers, validation, the atomic Parquet writer, provenance.

Every subcommand reads through :func:`open_source` and writes through :func:`write_table`, so
they share one schema (``prompt``, ``chosen``, ``rejected``, ``pair_id`` and optional columns,
see :mod:`prefnoise.columns`) and one provenance history kept in the Parquet file's metadata.
Inputs are read in record batches, so memory stays flat as files grow.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import hashlib
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from prefnoise import __version__
from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.errors import PrefnoiseError

METADATA_KEY = b"prefnoise"
DEFAULT_BATCH_SIZE = 16_384  # rows per record batch: ~16 MB of text at 1 KB a row keeps memory flat
LAYOUTS = ("auto", "hh")
HH_ASSISTANT = "\n\nAssistant:"
_STDIN = "-"
_FULL_HASH_LIMIT = 256 * 2**20  # files above this are fingerprinted by sampled blocks


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the prompt and the two responses."""

    prompt: str = C.PROMPT
    chosen: str = C.CHOSEN
    rejected: str = C.REJECTED


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


def file_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a file or directory of files (blake2b).

    Parquet files are fingerprinted by size and footer (the footer records every column chunk's
    offsets, compressed sizes and statistics, so content changes show), other files by their bytes
    (sampled blocks above 256 MiB). Either way a 10 GB input costs milliseconds, not a full read.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=16)
    kinds = set()
    for file in files:
        size = file.stat().st_size
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
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
    """The provenance history stored in a Parquet file written by prefnoise ([] if none)."""
    return _read_metadata(Path(path)).get("history", [])


def _read_metadata(path: Path) -> dict[str, Any]:
    files = _parquet_files(path) if path.is_dir() else [path]
    if not files:
        return {}
    try:
        metadata = pq.read_metadata(files[0]).metadata or {}
    except (pa.ArrowInvalid, OSError) as error:
        raise PrefnoiseError(
            f"{files[0]}: cannot read as parquet ({str(error).splitlines()[0]}); check the file is complete"
        ) from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {}


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
    return sorted(p for p in directory.rglob("*.parquet") if p.is_file())


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf-dataset"
        if (path / "dataset_dict.json").exists():
            raise PrefnoiseError(
                f"{path}: is a DatasetDict with several splits; pass one split's directory, e.g. {path / 'train'}"
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
    with os.fdopen(fd, "wb") as handle:
        shutil.copyfileobj(sys.stdin.buffer, handle)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return Path(name)


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
    ) -> None:
        if layout not in LAYOUTS:
            raise PrefnoiseError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        self.name = "<stdin>" if str(source) == _STDIN else str(source)
        path = _spool_stdin() if str(source) == _STDIN else Path(source)
        if not path.exists():
            raise PrefnoiseError(f"{self.name}: no such file or directory")
        self.path = path
        self.format = _detect_format(path)
        self.columns = columns or ColumnMap()
        self.layout = layout
        self.drop_invalid = drop_invalid
        self.batch_size = batch_size
        self.rows_read = 0
        self.dropped: dict[str, int] = {}
        self._fingerprint: str | None = None
        self._schema: pl.Schema | None = None
        self.history: list[dict[str, Any]] = _read_metadata(path).get("history", []) if self.format == "parquet" else []

    # -- public -------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the input, recorded in provenance."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.path)
        return self._fingerprint

    @property
    def schema(self) -> pl.Schema:
        """The canonical schema the batches will have (reads the first batch)."""
        if self._schema is None:
            first = next(self._canonical_batches(count=False), None)
            if first is None:
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
        """The file as it is (no column mapping or validation) as a LazyFrame, for long tables and
        column projection: Parquet and plain CSV stay lazy, other formats are read whole."""
        if self.format == "parquet":
            return pl.scan_parquet(self.path if self.path.is_file() else f"{self.path}/**/*.parquet")
        if self.format == "csv" and self.path.suffix.lower() in (".csv", ".tsv"):
            return pl.scan_csv(self.path, separator="\t" if self.path.suffix.lower() == ".tsv" else ",")
        batches = list(self._arrow_batches())
        if not batches:
            raise PrefnoiseError(f"{self.name}: contains no rows")
        frame = pl.from_arrow(pa.Table.from_batches(batches))
        assert isinstance(frame, pl.DataFrame)
        return frame.lazy()

    def total_rows(self) -> int | None:
        """Row count from file metadata when it is free to get (Parquet, saved datasets), else None."""
        if self.format == "parquet":
            files = _parquet_files(self.path) if self.path.is_dir() else [self.path]
            return sum(pq.read_metadata(f).num_rows for f in files)
        if self.format == "hf-dataset":
            return self._hf_table().num_rows
        return None

    # -- internals ----------------------------------------------------------------------

    def _hf_table(self) -> pa.Table:
        import datasets

        try:
            dataset = datasets.load_from_disk(str(self.path))
        except Exception as error:  # datasets raises many types for unreadable directories
            raise PrefnoiseError(f"{self.name}: cannot load saved dataset ({error})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise PrefnoiseError(f"{self.name}: is a DatasetDict ({', '.join(dataset)}); pass one split's directory")
        return dataset.with_format("arrow").data.table

    def _arrow_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            if self.format == "parquet":
                files = _parquet_files(self.path) if self.path.is_dir() else [self.path]
                for file in files:
                    # pre_buffer=False: the default caches read ranges and memory then grows with the file
                    yield from pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=self.batch_size)
            elif self.format == "json":
                options = pa_json.ReadOptions(block_size=32 * 2**20)
                yield from pa_json.open_json(pa.input_stream(str(self.path)), read_options=options)
            elif self.format == "csv":
                options = pa_csv.ReadOptions(block_size=32 * 2**20)
                parse = pa_csv.ParseOptions(
                    delimiter="\t" if ".tsv" in self.path.suffixes else ",",
                    newlines_in_values=True,
                )
                yield from pa_csv.open_csv(pa.input_stream(str(self.path)), read_options=options, parse_options=parse)
            else:
                yield from self._hf_table().to_batches(max_chunksize=self.batch_size)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise PrefnoiseError(
                f"{self.name}: cannot read as {self.format} ({message}); check the file is complete and in that format"
            ) from None

    def _canonical_batches(self, *, count: bool) -> Iterator[pl.DataFrame]:
        offset = 0
        for record_batch in self._arrow_batches():
            if record_batch.num_rows == 0:
                continue
            frame = pl.from_arrow(record_batch)
            assert isinstance(frame, pl.DataFrame)
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


def open_source(
    source: str | Path,
    *,
    columns: ColumnMap | None = None,
    layout: str = "auto",
    drop_invalid: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PreferenceSource:
    """Open a Parquet file or shard directory, JSONL(.gz), CSV, saved dataset, or ``-`` (stdin)."""
    return PreferenceSource(source, columns=columns, layout=layout, drop_invalid=drop_invalid, batch_size=batch_size)


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
    frame = _apply_column_map(frame, columns, name)
    frame = frame.with_row_index("__row", offset=row_offset + 1)
    invalid: dict[str, pl.Expr] = {}
    if _is_conversational(frame):
        frame, mismatch = _from_conversational(frame, name)
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


def _apply_column_map(frame: pl.DataFrame, columns: ColumnMap, name: str) -> pl.DataFrame:
    renames = {}
    for canonical, given in (
        (C.PROMPT, columns.prompt),
        (C.CHOSEN, columns.chosen),
        (C.REJECTED, columns.rejected),
    ):
        if given == canonical:
            continue
        if given not in frame.columns:
            raise PrefnoiseError(
                f"{name}: no column {given!r} (asked for as the {canonical} column); "
                f"columns are: {', '.join(frame.columns)}"
            )
        if canonical in frame.columns and canonical not in (columns.prompt, columns.chosen, columns.rejected):
            frame = frame.rename({canonical: f"original_{canonical}"})
        renames[given] = canonical
    return frame.rename(renames) if renames else frame


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
    """Anthropic HH layout: prompt = transcript up to the last '\\n\\nAssistant:'."""
    if C.PROMPT in frame.columns:
        raise PrefnoiseError(f"{name}: --layout hh expects no 'prompt' column, but one exists")
    for column in (C.CHOSEN, C.REJECTED):
        if column not in frame.columns or frame.schema[column] != pl.String:
            raise PrefnoiseError(f"{name}: --layout hh needs text columns 'chosen' and 'rejected'")
    pattern = r"(?s)^(.*\n\nAssistant:)(.*)$"  # greedy: splits at the LAST assistant turn
    frame = frame.with_columns(
        pl.col(C.CHOSEN).str.extract(pattern, 1).alias("__prompt_c"),
        pl.col(C.REJECTED).str.extract(pattern, 1).alias("__prompt_r"),
        pl.col(C.CHOSEN).str.extract(pattern, 2).str.strip_chars_start(" ").alias(C.CHOSEN),
        pl.col(C.REJECTED).str.extract(pattern, 2).str.strip_chars_start(" ").alias(C.REJECTED),
    )
    mismatch = pl.col("__prompt_c").is_null() | (pl.col("__prompt_c") != pl.col("__prompt_r"))
    frame = frame.with_columns(mismatch.fill_null(True).alias("__mismatch"), pl.col("__prompt_c").alias(C.PROMPT)).drop(
        "__prompt_c", "__prompt_r"
    )
    return frame, pl.col("__mismatch")


def _is_conversational(frame: pl.DataFrame) -> bool:
    dtype = frame.schema.get(C.CHOSEN)
    return isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)


def _render_messages(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def _response_text(messages: list[dict[str, Any]]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return _render_messages(messages)


def _from_conversational(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr]:
    """TRL's conversational format: lists of {role, content}, explicit or implicit prompt."""
    chosen_lists = frame[C.CHOSEN].to_list()
    rejected_lists = frame[C.REJECTED].to_list()
    explicit = C.PROMPT in frame.columns and isinstance(frame.schema[C.PROMPT], pl.List)
    prompt_lists = frame[C.PROMPT].to_list() if explicit else [None] * frame.height
    prompts, prompt_json, chosen, rejected, mismatch = [], [], [], [], []
    for prompt, chosen_msgs, rejected_msgs in zip(prompt_lists, chosen_lists, rejected_lists):
        chosen_msgs, rejected_msgs = chosen_msgs or [], rejected_msgs or []
        if prompt is None:
            prompt = chosen_msgs[:-1]
            differs = prompt != rejected_msgs[:-1]
            chosen_msgs, rejected_msgs = chosen_msgs[-1:], rejected_msgs[-1:]
        else:
            differs = False
        mismatch.append(differs)
        prompts.append(_render_messages(prompt))
        prompt_json.append(json.dumps(prompt, ensure_ascii=False))
        chosen.append(_response_text(chosen_msgs))
        rejected.append(_response_text(rejected_msgs))
    frame = frame.with_columns(
        pl.Series(C.PROMPT, prompts, dtype=pl.String),
        pl.Series(C.PROMPT_MESSAGES, prompt_json, dtype=pl.String),
        pl.Series(C.CHOSEN, chosen, dtype=pl.String),
        pl.Series(C.REJECTED, rejected, dtype=pl.String),
        pl.Series("__mismatch", mismatch, dtype=pl.Boolean),
    )
    return frame, pl.col("__mismatch")


# --------------------------------------------------------------------------- writing


def write_table(
    data: pl.DataFrame | Iterable[pl.DataFrame],
    dest: str | Path,
    *,
    entry: HistoryEntry | dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    row_group_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    """Write frames atomically as zstd Parquet (``-`` for stdout) with history; return rows written.

    ``history`` defaults to the entry's source history; ``entry`` is appended to it.
    """
    frames = [data] if isinstance(data, pl.DataFrame) else data
    if history is None:
        source = entry.source if isinstance(entry, HistoryEntry) else None
        history = list(source.history) if source is not None else []
    to_stdout = str(dest) == _STDIN
    target = Path(tempfile.mkdtemp(prefix="prefnoise-out-")) / "out.parquet" if to_stdout else Path(dest)
    rows = 0
    try:
        with atomic_path(target) as tmp:
            writer: _BackgroundWriter | None = None
            try:
                for frame in frames:
                    table = _drop_internal(frame).to_arrow()
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
            with open(target, "rb") as handle:
                shutil.copyfileobj(handle, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    finally:
        if to_stdout:
            shutil.rmtree(target.parent, ignore_errors=True)
    return rows


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
