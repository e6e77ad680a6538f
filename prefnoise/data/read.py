"""Reading a preference table: :class:`PreferenceSource` streams any supported source as validated
canonical record batches (memory stays flat as files grow) or as a lazy raw frame."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from polars.exceptions import PanicException
from polars.io.plugins import register_io_source

from prefnoise.data.canonical import LAYOUTS, canonicalize
from prefnoise.data.json_lines import json_lines_batches
from prefnoise.data.locate import (
    check_saved_dataset,
    detect_format,
    open_stream_input,
    parquet_files,
    pick_saved_split,
    resolve_hub,
    spool_stdin,
)
from prefnoise.data.mapping import ColumnMap, check_column_map, map_score_columns
from prefnoise.data.provenance import file_fingerprint, read_provenance
from prefnoise.data.read_ahead import read_ahead
from prefnoise.data.schema import (
    DEFAULT_BATCH_SIZE,
    STDIN,
    check_batch,
    check_shard_schemas,
    first_error_line,
    to_polars,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.hub import HubFiles


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
        self.name = "<stdin>" if str(source) == STDIN else str(source)
        path = spool_stdin() if str(source) == STDIN else open_stream_input(Path(source), self.name)
        self.split, self.config = split, config
        self._hub_cached: Callable[[], Any] | None = None
        hub = resolve_hub(str(source), path, split=split, config=config)
        if hub is not None:
            path = hub.root
            self.split, self.config = hub.split, hub.config  # recorded in provenance
        elif not path.exists():
            raise PrefnoiseError(f"{self.name}: no such file or directory")
        else:
            path = pick_saved_split(path, split, config, self.name)
        self.path = path
        self.columns = columns or ColumnMap()
        check_column_map(self.columns)
        self.layout = layout
        self.drop_invalid = drop_invalid
        self.batch_size = batch_size
        self.rows_read = 0
        self.dropped: dict[str, int] = {}
        self._fingerprint: str | None = None
        self._schema: pl.Schema | None = None
        self._files: list[Path] = []
        self._shard_columns: list[str] | None = None
        self._mixed_json: set[Path] = set()  # JSON lines files read by polars (json_lines_batches)
        self._multi = path.is_dir()  # errors name each file of a directory, else the source
        if isinstance(hub, HubFiles):
            self.format = hub.format
            self._files = list(hub.files)
            if self.format == "parquet":
                self._shard_columns = check_shard_schemas(self._files)
        elif hub is not None:
            self.format = "hf-dataset"
            self._hub_cached = hub.load
        else:
            self.format = detect_format(path)
            if self.format == "parquet":
                self._files = parquet_files(path) if path.is_dir() else [path]
                if path.is_dir():
                    self._shard_columns = check_shard_schemas(self._files)
            elif self.format == "hf-dataset":
                check_saved_dataset(path)
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
            first = next(self._canonical_batches(self._arrow_batches(), count=False), None)  # no read-ahead: one batch
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
        # the next batch decodes while this one is used
        return self._canonical_batches(read_ahead(self._arrow_batches()), count=True)

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
        return to_polars(table, self.name).lazy()

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
        schema = to_polars(arrow_schema.empty_table(), label).schema

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
                        check_batch(batch, label, row)
                        row += batch.num_rows
                        frame = to_polars(batch, label)
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
        import datasets  # heavy (pulls in pandas, fsspec, ...): only for saved datasets

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
                label = str(file) if self.path.is_dir() else self.name
                # every byte passes the nesting check before the parser, which recurses once per level
                yield label, functools.partial(
                    json_lines_batches, file, label, options, batch_size=self.batch_size, mixed=self._mixed_json
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
                    check_batch(batch, label, row)
                    row += batch.num_rows
                    yield batch
            except (pa.ArrowException, OSError, pl.exceptions.PolarsError, PanicException) as error:  # polars: JSON
                raise self._read_error(label, error) from None

    def _canonical_batches(self, record_batches: Iterable[pa.RecordBatch], *, count: bool) -> Iterator[pl.DataFrame]:
        offset = 0
        for record_batch in record_batches:
            if record_batch.num_rows == 0:
                continue
            frame = to_polars(record_batch, self.name)
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
    split: str | None = None,
    config: str | None = None,
) -> PreferenceSource:
    """Open a Parquet file or shard directory, JSONL(.gz), CSV, saved dataset, hub-layout directory,
    hub dataset id found in the local Hugging Face caches (``split``/``config`` pick one part of
    those; offline, :mod:`prefnoise.hub`), or ``-`` (stdin).

    Values may nest at most :data:`~prefnoise.data.nesting.MAX_NESTING` (100) levels of lists and
    objects: a deeper JSON line (or Arrow column) is a one-line PrefnoiseError naming the file and
    line (or column), raised before a parser recurses into it."""
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
