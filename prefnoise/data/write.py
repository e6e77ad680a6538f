"""Writing tables: atomic Parquet (with the provenance history in its metadata), JSON lines or CSV,
or Parquet on stdout."""

from __future__ import annotations

import io
import json
import queue
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from polars.exceptions import PanicException
from polars.io.plugins import register_io_source

from prefnoise import __version__
from prefnoise.atomic import atomic_path
from prefnoise.data.conversational import MESSAGE_COLUMNS, to_conversational
from prefnoise.data.provenance import METADATA_KEY, HistoryEntry
from prefnoise.data.schema import DEFAULT_BATCH_SIZE, STDIN, drop_internal, first_error_line, to_polars
from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import check_output_file, releases_outputs


@releases_outputs
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
    source_path = entry.source.path if isinstance(entry, HistoryEntry) and entry.source is not None else None
    check_output_file(dest, inputs=[source_path], overwrite=overwrite)
    kind = output_format(dest)
    frames = [data] if isinstance(data, pl.DataFrame) else data
    if kind != "parquet":
        return _write_text_table(frames, Path(dest), kind)
    if history is None:
        source = entry.source if isinstance(entry, HistoryEntry) else None
        history = list(source.history) if source is not None else []
    to_stdout = str(dest) == STDIN
    target = Path(tempfile.mkdtemp(prefix="prefnoise-out-")) / "out.parquet" if to_stdout else Path(dest)
    rows = 0
    try:
        with atomic_path(target) as tmp:
            writer: _BackgroundWriter | _SinkWriter | None = None
            message_types: dict[str, pa.DataType] = {}
            try:
                for frame in frames:
                    batch = _writable(drop_internal(frame), message_types)
                    if writer is None:
                        schema = batch.schema if isinstance(batch, pa.Table) else batch.head(0).to_arrow().schema
                        writer = _parquet_writer(tmp, schema, row_group_size)
                    writer.put(batch)
                    rows += len(batch)
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
    if str(dest) == STDIN:
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
    rows = 0
    header = True
    message_types: dict[str, pa.DataType] = {}
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        for frame in frames:
            table = to_conversational(drop_internal(frame).to_arrow(), message_types)
            out = to_polars(table, str(dest))
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


def _writable(frame: pl.DataFrame, message_types: dict[str, pa.DataType]) -> pl.DataFrame | pa.Table:
    """A batch as the Parquet writers take it: the frame itself, or a conversational one as an Arrow
    table in TRL's format (:func:`to_conversational`)."""
    if all(helper in frame.columns for helper, _ in MESSAGE_COLUMNS):
        return to_conversational(frame.to_arrow(), message_types)
    return frame


def _parquet_writer(path: Path, schema: pa.Schema, row_group_size: int) -> _BackgroundWriter | _SinkWriter:
    """polars' multi-threaded Parquet encoder when it can store ``schema`` exactly, else pyarrow's."""
    try:
        empty = pl.from_arrow(schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        empty.lazy().sink_parquet(io.BytesIO(), arrow_schema=schema)
    except Exception:  # a type polars cannot write as the table's own Arrow type: pyarrow writes it
        return _BackgroundWriter(path, schema, row_group_size)
    return _SinkWriter(path, schema, empty.schema, row_group_size)


class _SinkAborted(Exception):
    """Stops a _SinkWriter's polars sink without a file (the run failed)."""


_ABORT = object()


class _SinkWriter:
    """polars' ``sink_parquet`` on a thread of its own, fed Arrow tables through a small queue.

    polars encodes and compresses the columns of a row group on every core (pyarrow's writer uses
    one), with pyarrow's zstd level and the tables' own Arrow schema stored in the file, so a reader
    gets the same types and values as from :class:`_BackgroundWriter`. The queue bound keeps at most
    two batches waiting; the key-value metadata is handed over when the last table is in.
    """

    def __init__(self, path: Path, schema: pa.Schema, frame_schema: pl.Schema, row_group_size: int) -> None:
        self.schema, self.frame_schema = schema, frame_schema
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.metadata: dict[str, str] = {}
        self.error: BaseException | None = None
        source = register_io_source(self._frames, schema=frame_schema)
        self.thread = threading.Thread(
            target=self._run, args=(source, path, row_group_size), name="prefnoise-parquet-sink", daemon=True
        )
        self.thread.start()

    def _frames(self, with_columns: Any, predicate: Any, n_rows: Any, batch_size: Any) -> Iterable[pl.DataFrame]:
        while (frame := self.queue.get()) is not None:
            if frame is _ABORT:
                raise _SinkAborted
            yield frame

    def _run(self, source: pl.LazyFrame, path: Path, row_group_size: int) -> None:
        try:
            source.sink_parquet(
                path, compression="zstd", compression_level=pa.Codec.default_compression_level("zstd"),
                row_group_size=row_group_size, metadata=lambda _context: self.metadata, arrow_schema=self.schema,
            )
        except BaseException as error:  # re-raised in the caller's thread
            self.error = error

    def put(self, batch: pl.DataFrame | pa.Table | None | object) -> None:
        """Queue one batch (cast to the file's schema) for writing; re-raise a writer failure."""
        if isinstance(batch, pl.DataFrame) and batch.schema != self.frame_schema:
            batch = batch.to_arrow()  # cast as pyarrow's writer does, so both refuse the same batches
        if isinstance(batch, pa.Table):
            batch = pl.from_arrow(batch if batch.schema == self.schema else batch.cast(self.schema))
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise self.error or PrefnoiseError("the Parquet writer stopped") from None

    def finish(self, metadata: dict[bytes, str]) -> None:
        """Hand over the key-value metadata, then wait for every queued table and the file's footer."""
        self.metadata = {key.decode(): value for key, value in metadata.items()}
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the sink (if still running) without finishing the file."""
        if self.thread.is_alive():
            try:
                self.put(_ABORT)
            except BaseException:  # noqa: S110 - the sink failed already; nothing left to stop
                pass
            self.thread.join()


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

    def put(self, batch: pl.DataFrame | pa.Table) -> None:
        """Queue one batch (cast to the file's schema) for writing; re-raise a writer failure."""
        if self.error is not None:
            raise self.error
        table = batch.to_arrow() if isinstance(batch, pl.DataFrame) else batch
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
