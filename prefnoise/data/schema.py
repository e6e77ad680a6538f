"""Record batches as prefnoise accepts them: valid Arrow data and UTF-8 in every column (nested
ones too), unique column names, one schema across the shards of a directory; and their conversion to
polars. Every reader checks each batch here before any other use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from polars.exceptions import PanicException

from prefnoise.data.nesting import check_type_depth
from prefnoise.errors import PrefnoiseError

DEFAULT_BATCH_SIZE = 16_384  # rows per record batch: ~16 MB of text at 1 KB a row keeps memory flat


STDIN = "-"


def first_error_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type name: the cause in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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


def check_shard_schemas(files: list[Path]) -> list[str]:
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


def check_batch(batch: pa.RecordBatch, label: str, row_offset: int) -> None:
    """PrefnoiseError for the first invalid column of ``batch``: invalid UTF-8 (naming the first
    row, 1-based, counted from ``row_offset``), malformed Arrow data, or values nested deeper than
    :data:`~prefnoise.data.nesting.MAX_NESTING` levels (which would crash polars)."""
    check_type_depth(batch.schema, label)
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


def to_polars(data: pa.RecordBatch | pa.Table, name: str) -> pl.DataFrame:
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


def drop_internal(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` without prefnoise's internal ``__`` columns, which are never written."""
    internal = [c for c in frame.columns if c.startswith("__")]
    return frame.drop(internal) if internal else frame
