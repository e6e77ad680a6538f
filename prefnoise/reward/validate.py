"""Numbers a reward model trains on or produces must be finite: feature vectors in, rewards out.

A NaN or inf feature does not stop training: it turns every weight it touches into NaN, and a
NaN model still "scores" (NaN margins compare false, so agreement reads as a number). These checks
stop that at the door with a message that names the file, the column and the first row at fault.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError

FEATURE_COLUMNS = (C.chosen(C.FEATURES), C.rejected(C.FEATURES), C.FEATURES)
DROP_REASON = "non-finite feature values"  # the key of the drop count, as in PreferenceSource.dropped


def _as_lists(series: pl.Series) -> pl.Series | None:
    """``series`` as a List column of numbers (None: not vectors of numbers; their reader reports the type)."""
    if isinstance(series.dtype, pl.Array):
        series = series.arr.to_list()
    if not isinstance(series.dtype, pl.List) or not series.dtype.inner.is_numeric():
        return None
    return series


def _row_flags(lists: pl.Series) -> pl.Series:
    """Per row: True where the vector is null or holds a null, NaN or ±inf entry."""
    bad_entry = lists.list.eval(~pl.element().is_finite().fill_null(False)).list.any().fill_null(False)
    return lists.is_null() | bad_entry


def _what_is_wrong(vector: list | None) -> str:
    """What is wrong with one flagged vector, as a message says it: its first null, NaN or ±inf entry."""
    if vector is None:
        return "a missing vector (null)"
    for value in vector:
        if value is None:
            return "a missing value (null)"
        if not math.isfinite(value):
            return f"a non-finite value ({'nan' if math.isnan(value) else 'inf' if value > 0 else '-inf'})"
    return "a non-finite value"


def check_finite_features(
    frame: pl.DataFrame,
    name: str = "data",
    drop_invalid: bool = False,
    *,
    columns: Sequence[str] | None = None,
) -> tuple[pl.DataFrame, int]:
    """``frame`` with only finite feature vectors, and how many rows were dropped to get there.

    Checks ``columns`` (default: whichever of chosen_features, rejected_features, features exist)
    for null vectors and null, NaN or ±inf entries. Without ``drop_invalid`` the first bad row
    raises PrefnoiseError naming ``name`` (the file), the column and the row (1-based, in
    ``frame``'s order); with it those rows are dropped and counted (every row dropped is an error).
    """
    columns = [c for c in (FEATURE_COLUMNS if columns is None else columns) if c in frame.columns]
    bad = pl.Series("bad", np.zeros(frame.height, dtype=bool))
    flagged = []
    for column in columns:
        lists = _as_lists(frame[column])
        if lists is None:
            continue
        flags = _row_flags(lists)
        n_bad = int(flags.sum())
        if n_bad == 0:
            continue
        if not drop_invalid:
            row = int(flags.arg_max())  # the first True
            what = _what_is_wrong(lists[row])
            pair = f" (pair_id {frame[C.PAIR_ID][row]})" if C.PAIR_ID in frame.columns else ""
            more = f", and {n_bad - 1} more row(s)" if n_bad > 1 else ""
            raise PrefnoiseError(
                f"{name}: column {column!r} has {what} at row {row + 1}{pair}{more}; "
                "fix it or pass --drop-invalid to skip such rows"
            )
        bad = bad | flags
        flagged.append(column)
    dropped = int(bad.sum())
    if dropped == 0:
        return frame, 0
    if dropped == frame.height:
        raise PrefnoiseError(
            f"{name}: all {frame.height} rows have non-finite feature values in {', '.join(map(repr, flagged))}; "
            "nothing is left to use"
        )
    return frame.filter(~bad), dropped

