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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from polars.exceptions import PanicException
from polars.io.plugins import register_io_source

from prefnoise import __version__
from prefnoise.atomic import atomic_path, stop_signals_deferred
from prefnoise.data.conversational import carries_messages, to_conversational
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
            writer: _SinkWriter | _ArrowWriter | None = None
            try:
                for frame in frames:
                    frame = drop_internal(frame)
                    if writer is None:
                        # the sink's thread creates the file: a stop signal before ``writer`` holds it would leave
                        # that thread writing after the clean-up below; it is raised once ``close`` can stop it
                        with stop_signals_deferred():
                            writer = _open_writer(tmp, frame, row_group_size)
                    rows += writer.put(frame)
                if writer is None:
                    raise PrefnoiseError("no rows to write: every input row was filtered out")
                record = entry.to_dict(rows_out=rows) if isinstance(entry, HistoryEntry) else entry
                full_history = history + ([record] if record else [])
                payload = {"format": 1, "prefnoise_version": __version__, "history": full_history}
                writer.finish({METADATA_KEY.decode(): json.dumps(payload, default=str)})
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


def _open_writer(path: Path, first: pl.DataFrame, row_group_size: int) -> _SinkWriter | _ArrowWriter:
    """The Parquet writer for a table whose first batch is ``first``: polars' sink, or for a conversational
    table (written as TRL's message lists) pyarrow's writer, which keeps the lists' ``list<struct<string>>``
    types where polars would write large ones."""
    if carries_messages(first.columns):
        return _ArrowWriter(path, row_group_size)
    return _SinkWriter(path, first.schema, row_group_size)


class _Aborted(Exception):
    """Raised inside the sink's source when the caller gives up: the sink stops without finishing."""


_ABORT = object()


class _SinkWriter:
    """polars' streaming Parquet sink on a thread of its own, fed frames through a small queue.

    The sink encodes and compresses every column on all cores (pyarrow's ParquetWriter encodes one
    row group at a time on one), in row groups of ``row_group_size``. It runs off the main thread so
    that a signal still reaches the caller at once; the queue bound keeps at most two frames in
    flight. The key-value metadata is added when the last frame is in (``finish``).

    The sink writes to a file this thread opened, never to a path: when its source fails, polars'
    ``sink_parquet`` can return before its own task has opened the path, and that task then recreated
    the file after the caller's clean-up had removed it (seen under load, about 1 failed write in 30).
    """

    def __init__(self, path: Path, schema: pl.Schema, row_group_size: int) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by finish or close)
        self.schema = schema
        self.arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.metadata: dict[str, str] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.thread = threading.Thread(
            target=self._run, args=(row_group_size,), name="prefnoise-parquet-writer", daemon=True
        )
        self.thread.start()

    def _frames(self, *_: Any) -> Iterator[pl.DataFrame]:
        while (frame := self.queue.get()) is not None:
            if frame is _ABORT:
                self.done = True
                raise _Aborted
            yield frame
        self.done = True

    def _run(self, row_group_size: int) -> None:
        try:
            register_io_source(self._frames, schema=self.schema).sink_parquet(
                self.handle, compression="zstd", compression_level=1, row_group_size=row_group_size,
                metadata=lambda _: self.metadata or {},
            )
        except BaseException as error:  # re-raised in the caller's thread
            self.error = error
        while not self.done:  # after a failure: drain until the caller stops putting
            item = self.queue.get()
            self.done = item is None or item is _ABORT

    def put(self, frame: pl.DataFrame) -> int:
        """Queue one frame (cast to the file's schema) for writing; return its rows; re-raise a writer failure."""
        if self.error is not None:
            raise self.error
        if frame.schema != self.schema:  # Arrow's safe cast: refuses to truncate 1.5 to an integer column
            frame = pl.DataFrame(frame.to_arrow().cast(self.arrow_schema))
        self.queue.put(frame)
        return frame.height

    def finish(self, metadata: dict[str, str]) -> None:
        """Add the key-value metadata, then wait for every queued frame to be written."""
        self.metadata = metadata
        self._join(None)
        if self.error is not None:
            raise self.error
        self.handle.close()

    def close(self) -> None:
        """Stop the sink (if still running) without finishing the file, and close the file."""
        self._join(_ABORT)
        self.handle.close()

    def _join(self, last: Any) -> None:
        if self.thread.is_alive():
            self.queue.put(last)
            self.thread.join()


class _ArrowWriter:
    """A pyarrow ParquetWriter fed through a small queue by a thread of its own, for conversational tables.

    Each frame's JSON message columns become TRL's message lists (:func:`to_conversational`), typed by the
    first batch. Encoding a row group (GIL released) overlaps with preparing the next one; the queue bound
    keeps at most two batches in flight.
    """

    def __init__(self, path: Path, row_group_size: int) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.message_types: dict[str, pa.DataType] = {}
        self.row_group_size = row_group_size
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="prefnoise-parquet-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (table := self.queue.get()) is not None:
            if self.error is None:
                try:
                    assert self.writer is not None
                    self.writer.write_table(table, row_group_size=self.row_group_size)
                except BaseException as error:  # re-raised in the caller's thread
                    self.error = error

    def put(self, frame: pl.DataFrame) -> int:
        """Queue one frame as TRL's message lists (cast to the file's schema); return its rows; re-raise a
        writer failure."""
        if self.error is not None:
            raise self.error
        table = to_conversational(frame.to_arrow(), self.message_types)
        if self.writer is None:  # the file's schema is the first batch's
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        schema = self.writer.schema
        self.queue.put(table if table.schema == schema else table.cast(schema))
        return table.num_rows

    def finish(self, metadata: dict[str, str]) -> None:
        """Wait for every queued table, then add the key-value metadata."""
        self._join()
        if self.error is not None:
            raise self.error
        assert self.writer is not None
        self.writer.add_key_value_metadata(metadata)

    def close(self) -> None:
        """Stop the thread (if still running) and close the file."""
        self._join()
        if self.writer is not None:
            self.writer.close()

    def _join(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
