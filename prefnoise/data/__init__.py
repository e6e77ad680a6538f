"""The data layer: one canonical preference table read from any supported source and written back.

Every subcommand reads through :func:`open_source` (or :func:`open_input`, from the shared input
options) and writes through :func:`write_table`, so they share one schema (``prompt``, ``chosen``,
``rejected``, ``pair_id`` and optional columns, see :mod:`prefnoise.columns`) and one provenance
history kept in the Parquet file's metadata. Inputs are read in record batches, so memory stays flat
as files grow.

The modules, lowest first (each imports only those before it):
:mod:`~prefnoise.data.schema` (batch checks, Arrow to polars), :mod:`~prefnoise.data.locate` (what a
source is and holds), :mod:`~prefnoise.data.mapping` (column map, struct paths, true scores),
:mod:`~prefnoise.data.provenance` (history, fingerprints), :mod:`~prefnoise.data.conversational`
(TRL messages), :mod:`~prefnoise.data.canonical` (one batch into canonical form),
:mod:`~prefnoise.data.read`, :mod:`~prefnoise.data.write` and :mod:`~prefnoise.data.inputs`.
"""

from __future__ import annotations

from prefnoise.data.canonical import HH_ASSISTANT, LAYOUTS, canonicalize, content_pair_ids, hh_prompt_length
from prefnoise.data.inputs import open_input
from prefnoise.data.mapping import (
    TRL_SCORE_COLUMNS,
    ColumnMap,
    map_score_columns,
    path_dtype,
    path_expr,
    recognise_scores,
    resolve_path,
    score_candidates,
    score_hint,
)
from prefnoise.data.provenance import (
    METADATA_KEY,
    HistoryEntry,
    file_fingerprint,
    new_history_entry,
    read_history,
    read_provenance,
)
from prefnoise.data.read import PreferenceSource, open_source, read_table
from prefnoise.data.schema import DEFAULT_BATCH_SIZE, check_batch, first_error_line, to_polars
from prefnoise.data.write import OUTPUT_FORMATS, output_format, write_table

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "HH_ASSISTANT",
    "LAYOUTS",
    "METADATA_KEY",
    "OUTPUT_FORMATS",
    "TRL_SCORE_COLUMNS",
    "ColumnMap",
    "HistoryEntry",
    "PreferenceSource",
    "canonicalize",
    "check_batch",
    "content_pair_ids",
    "file_fingerprint",
    "first_error_line",
    "hh_prompt_length",
    "map_score_columns",
    "new_history_entry",
    "open_input",
    "open_source",
    "output_format",
    "path_dtype",
    "path_expr",
    "read_history",
    "read_provenance",
    "read_table",
    "recognise_scores",
    "resolve_path",
    "score_candidates",
    "score_hint",
    "to_polars",
    "write_table",
]
