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

from prefnoise import __version__
from prefnoise.atomic import atomic_path
from prefnoise.data.conversational import to_conversational
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
            writer: _BackgroundWriter | None = None
            message_types: dict[str, pa.DataType] = {}
            try:
                for frame in frames:
                    table = to_conversational(drop_internal(frame).to_arrow(), message_types)
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
