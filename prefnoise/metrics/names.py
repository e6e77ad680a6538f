"""Names shared by the rank-metric modules: the long table's prompt key and the internal columns."""

from __future__ import annotations

import polars as pl

PROMPT_ID = "prompt_id"  # the long table's prompt key
LONG_REQUIRED = (PROMPT_ID,)

# Internal column names of the projected input.
SPLIT_COL, PROMPT_COL, TRUE_COL, PRED_COL = "_split", "_prompt", "_true", "_pred"

Frame = pl.DataFrame | pl.LazyFrame
