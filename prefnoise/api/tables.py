"""Tables in any form the API accepts (polars, pandas, pyarrow, datasets, paths), read into the canonical schema."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pyarrow as pa

from prefnoise import columns as C
from prefnoise.data import (
    LAYOUTS,
    ColumnMap,
    canonicalize,
    check_batch,
    first_error_line,
    map_score_columns,
    open_input,
    open_source,
    to_polars,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.options import Options, check_options

# A progress-bar factory: (description, total or None) -> context manager yielding advance(n).
ProgressBar = Callable[[str, "int | None"], AbstractContextManager[Callable[[int], None]]]
Table = Any  # polars DataFrame/LazyFrame, pandas DataFrame, pyarrow Table/RecordBatch, datasets.Dataset, str, Path

STDIO = "-"
NOTHING_WRITTEN = "no output was written."


# --------------------------------------------------------------------------- inputs


def _kind(table: Any) -> str:
    """``module.Class`` of ``table``'s type, e.g. ``pandas.DataFrame`` (its module's top package only)."""
    cls = type(table)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def table_label(table: Any) -> str:
    """How messages and summaries name ``table``: its path, ``<stdin>``, or ``<pandas.DataFrame>`` etc."""
    if isinstance(table, str | Path):
        return "<stdin>" if str(table) == STDIO else str(table)
    return f"<{_kind(table)}>"


def _is_path(table: Any) -> bool:
    return isinstance(table, str | Path)


def _to_arrow(table: Any, name: str) -> pa.Table | None:
    """An in-memory table of a non-polars library as an Arrow table (None for polars or unknown types)."""
    kind = _kind(table)
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if kind.startswith("pandas.") and type(table).__name__ == "DataFrame":
        try:
            return pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise PrefnoiseError(f"{name}: cannot convert the pandas columns ({first_line(error)})") from None
    if kind.startswith("datasets."):
        cls = type(table).__name__
        if cls in ("DatasetDict", "IterableDatasetDict"):
            raise PrefnoiseError(f"{name}: a DatasetDict ({', '.join(table)}); pass one split, e.g. table['train']")
        if cls == "IterableDataset":
            raise PrefnoiseError(f"{name}: an IterableDataset; materialise it first (Dataset.from_generator or take)")
        if cls == "Dataset":
            return table.with_format("arrow")[:]  # applies any select/shuffle index mapping
    return None


def first_line(error: BaseException) -> str:

    return first_error_line(error)


def raw_frame(table: Any, name: str | None = None) -> pl.DataFrame:
    """An in-memory table as a polars DataFrame, columns untouched (no mapping or validation)."""

    name = name or table_label(table)
    if isinstance(table, pl.LazyFrame):
        table = table.collect()
    if isinstance(table, pl.DataFrame):
        return table
    arrow = _to_arrow(table, name)
    if arrow is None and isinstance(table, Mapping | list):
        try:
            return pl.DataFrame(table)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as error:
            raise PrefnoiseError(f"{name}: cannot read as a table ({first_line(error)})") from None
    if arrow is None:
        raise PrefnoiseError(
            f"{name}: not a table prefnoise reads; pass a polars, pandas or pyarrow table, a datasets.Dataset, "
            "or a path"
        )
    offset = 0
    for batch in arrow.to_batches():
        check_batch(batch, name, offset)  # malformed or invalid-UTF-8 columns: a one-line error, as for files
        offset += batch.num_rows
    return to_polars(arrow, name)


def _column_map(options: dict[str, Any]):
    """The ColumnMap of the ``<field>_col`` options (every field ColumnMap has, e.g. prompt_col)."""

    values = {}
    for item in dataclasses.fields(ColumnMap):
        key = f"{item.name}_col"
        if key in options:
            values[item.name] = options.pop(key)
    return ColumnMap(**values)


class InputTable:
    """A preference table opened for a pn.* call: a file source (streamed like the CLI) or an in-memory
    table canonicalised once. ``batches()`` yields canonical frames, ``collect()`` the whole table."""

    def __init__(self, table: Table, *, warn_history: bool = True, **options: Any) -> None:
        self.name = table_label(table)
        self.source = None  # the PreferenceSource of a path (its history and fingerprint go into provenance)
        self._frame: pl.DataFrame | None = None
        self._dropped: dict[str, int] = {}
        if _is_path(table):

            self.source = open_input(str(table), warn_history=warn_history, **options)
            self.name = self.source.name
            return

        options = dict(options)
        columns = _column_map(options)
        layout = options.pop("layout", "auto")
        drop_invalid = options.pop("drop_invalid", False)
        unused = {k: v for k, v in options.items() if v not in (None, False)}
        if unused:
            raise PrefnoiseError(
                f"{self.name}: option {next(iter(unused))}= applies to paths and hub ids only, not to in-memory tables"
            )
        if layout not in LAYOUTS:
            raise PrefnoiseError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        raw = raw_frame(table, self.name)
        if raw.height == 0:
            raise PrefnoiseError(f"{self.name}: contains no rows")
        frame, self._dropped = canonicalize(
            raw, columns=columns, layout=layout, drop_invalid=drop_invalid, name=self.name
        )
        if frame.height == 0:
            raise PrefnoiseError(
                f"{self.name}: no valid rows: drop_invalid skipped every row; run without it to see why"
            )
        self._frame = frame

    @property
    def history(self) -> list[dict[str, Any]]:
        """The provenance history of a Parquet input ([] otherwise)."""
        return list(self.source.history) if self.source is not None else []

    @property
    def dropped(self) -> dict[str, int]:
        """Rows left out by drop_invalid, by reason."""
        return dict(self.source.dropped) if self.source is not None else dict(self._dropped)

    @property
    def schema(self) -> pl.Schema:
        """The canonical schema."""
        return self.source.schema if self.source is not None else self._frame.schema

    def total_rows(self) -> int | None:
        """Row count when it is free to get (None for a file whose format does not record it)."""
        return self.source.total_rows() if self.source is not None else self._frame.height

    def batches(self) -> Iterator[pl.DataFrame]:
        """Validated canonical batches (one for an in-memory table)."""
        return self.source.batches() if self.source is not None else iter([self._frame])

    def collect(self) -> pl.DataFrame:
        """The whole canonical table."""
        return self.source.collect() if self.source is not None else self._frame


def as_polars(
    table: Table,
    *,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    **input_options: Any,
) -> pl.DataFrame:
    """The canonical prefnoise table (``pair_id``, ``prompt``, ``chosen``, ``rejected``, ...) of ``table``.

    ``table``: a polars DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table or RecordBatch, a
    ``datasets.Dataset``, a dict of columns or list of rows, or a path (Parquet, JSONL, CSV, saved dataset,
    shard directory; ``-`` for stdin). Column mapping, ``layout`` ("auto": canonical or TRL conversational;
    "hh": full transcripts) and validation are the CLI's (``prefnoise.data.canonicalize``): a ``pair_id``
    is added when absent, and a bad row raises PrefnoiseError unless ``drop_invalid`` skips it.
    """
    return InputTable(
        table, prompt_col=prompt_col, chosen_col=chosen_col, rejected_col=rejected_col, layout=layout,
        drop_invalid=drop_invalid, warn_history=False, **input_options,
    ).collect()


def input_table(table: Table, options: dict[str, Any]) -> InputTable:
    return InputTable(table, **options)


def raw_lazy(table: Table, **options: Any) -> pl.LazyFrame:
    """A table as it is (no validation; of the column options only the true-score mapping applies), lazily
    when it is a file: for scored and long tables. ``options``: ``chosen_score_col``/``rejected_score_col``
    and, for hub ids, ``split``/``config``."""

    columns = ColumnMap(chosen_score=options.pop("chosen_score_col", None),
                        rejected_score=options.pop("rejected_score_col", None))
    if _is_path(table):
        return open_source(str(table), columns=columns, **options).scan_raw()
    unused = [k for k, v in options.items() if v is not None]
    if unused:
        raise PrefnoiseError(f"{table_label(table)}: option {unused[0]}= applies to paths and hub ids only")
    lazy = table if isinstance(table, pl.LazyFrame) else raw_frame(table).lazy()
    return map_score_columns(lazy, columns, table_label(table))


def path_of(table: Table) -> str | None:
    """The input path to protect from being overwritten (None for in-memory tables)."""
    return str(table) if _is_path(table) else None


@contextlib.contextmanager
def no_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def check_api_options(values: dict[str, Any]) -> None:
    """The CLI's range checks of numeric options (seed, rate, ...), for calls that do not come through it."""
    check_options({k: v for k, v in values.items() if not k.startswith("_")})


OptionsT = TypeVar("OptionsT", bound=Options)


def build_options(cls: type[OptionsT], options: OptionsT | None, values: dict[str, Any]) -> OptionsT:
    """``options`` when the caller built one (then every option keyword must keep its default), else ``cls``
    built (and checked) from the option keywords in ``values`` (a call's ``locals()``)."""
    fields = {item.name: item for item in dataclasses.fields(cls)}
    given = {name: values[name] for name in fields if name in values}
    if options is None:
        return cls(**given)
    if not isinstance(options, cls):
        raise TypeError(f"options= takes a {cls.__name__}, got {type(options).__name__}")
    changed = [name for name, value in given.items() if value is not None and value != fields[name].default]
    if changed:
        raise TypeError(f"give options= or option keywords, not both (got {changed[0]}= as well)")
    return options


def input_option_names() -> frozenset[str]:
    """The input options every table-reading command shares: the parameters of ``prefnoise.data.open_input``."""
    return frozenset(inspect.signature(open_input).parameters) - {"source", "warn_history", "warn"}


def split_options(options: dict[str, Any], *, others: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input options, the rest) of keyword ``options``; the rest is a TypeError unless ``others`` names
    where they go."""
    names = input_option_names()
    inputs = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    if rest and others is None:
        raise TypeError(f"unexpected keyword argument {next(iter(rest))!r}")
    return inputs, rest


def gather_input_options(
    prompt_col: str, chosen_col: str, rejected_col: str, layout: str, drop_invalid: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "prompt_col": prompt_col, "chosen_col": chosen_col, "rejected_col": rejected_col, "layout": layout,
        "drop_invalid": drop_invalid, **split_options(extra)[0],
    }


def output_name(out: str | Path | None) -> str | None:
    return None if out is None else ("<stdout>" if str(out) == STDIO else str(out))
