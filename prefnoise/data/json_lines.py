"""Reading JSON lines: Arrow's streaming reader, and polars' for a file whose column mixes strings with
other JSON values (PandaLM's responses include a bare ``true``), which Arrow's reader cannot type."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json

from prefnoise.data.nesting import DepthCheckedJson, read_json_checked
from prefnoise.errors import PrefnoiseError, PrefnoiseWarning

# Arrow's message when a later value does not fit the type it inferred: "Column(/a/b) changed from string to boolean"
_TYPE_CHANGE = re.compile(r"Column\(/([^)]*)\) changed from (\w+) to (\w+)")
_CHUNK = 32 * 2**20  # bytes read (and nesting-checked) at a time before polars parses the whole file


def json_lines_batches(
    file: Path, label: str, options: pa_json.ReadOptions, *, batch_size: int, mixed: set[Path]
) -> Iterator[pa.RecordBatch]:
    """The record batches of JSON lines ``file`` (compressed or not), ``label`` naming it in errors.

    A column whose values mix types Arrow cannot unify (strings with ``true``, ``3.5`` or objects) is
    read as polars reads it, a string column holding the others as their JSON text, provided Arrow meets
    the mix in its first block (``options.block_size``), before any batch went out: the whole file is then read again,
    in memory, by polars' reader (after the same nesting check), and a PrefnoiseWarning says which
    column was read as text. ``mixed`` remembers such files, so that a second read goes to polars at
    once and warns no more. A mix found later is a PrefnoiseError naming the column. polars' own reading
    errors propagate, for the caller to word as every other reading error.
    """
    if file in mixed:
        yield from _read_with_polars(file, label).to_arrow().to_batches(max_chunksize=batch_size)
        return
    sent = False
    try:
        for batch in read_json_checked(pa.input_stream(str(file)), label, options):
            sent = True
            yield batch
        return
    except pa.ArrowInvalid as error:
        change = _TYPE_CHANGE.search(str(error))
        if change is None:
            raise
        column, before, after = change.groups()
        if sent:
            raise PrefnoiseError(
                f"{label}: column {column!r} holds {after} values after {before} ones past the file's first "
                f"{options.block_size / 2**20:g} MiB, too late to read it as text; write every value of that column "
                "as a JSON string"
            ) from None
    frame = _read_with_polars(file, label)
    mixed.add(file)
    warnings.warn(
        f"{label}: column {column!r} mixes {before} and {after} values; read as text (JSON text for the values "
        "that are not strings), as polars reads it, with any other column that mixes",
        PrefnoiseWarning,
        stacklevel=2,
    )
    yield from frame.to_arrow().to_batches(max_chunksize=batch_size)


def _read_with_polars(file: Path, label: str) -> pl.DataFrame:
    """JSON lines ``file`` as polars reads it whole (schema from every line), each line checked for
    nesting before the parser sees it."""
    checked = DepthCheckedJson(pa.input_stream(str(file)), label)
    buffer = io.BytesIO()
    try:
        while chunk := checked.read(_CHUNK):
            buffer.write(chunk)
    finally:
        checked.close()
    if checked.error is not None:
        raise checked.error
    buffer.seek(0)
    return pl.read_ndjson(buffer, infer_schema_length=None)
