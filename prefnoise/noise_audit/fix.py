"""Suspicion per pair, the cleaned table (--fix) and the most suspect pairs."""

from __future__ import annotations

from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import swap_responses
from prefnoise.noise_audit.estimate import MirrorMixture
from prefnoise.noise_audit.names import MARGIN, SUSPICION


def add_suspicion(frame: pl.DataFrame, mixture: MirrorMixture | None) -> pl.DataFrame:
    """``frame`` (with ``oof_margin``) plus ``suspicion`` = P(flipped | margin); null without a mixture
    (ε̂ undetermined: the ranking by margin stands, a calibrated probability does not)."""
    if mixture is None:
        return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(SUSPICION))
    return frame.with_columns(
        pl.Series(SUSPICION, mixture.posterior_flipped(frame[MARGIN].to_numpy()), dtype=pl.Float64)
    )


def clean_table(frame: pl.DataFrame, *, mode: str, threshold: float = 0.5) -> tuple[pl.DataFrame, int]:
    """Drop or swap back the pairs whose suspicion exceeds ``threshold``; return the table and how many."""
    if mode not in ("drop", "swap"):
        raise PrefnoiseError(f"--fix must be 'drop' or 'swap', got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise PrefnoiseError(f"--threshold must be within [0, 1], got {threshold}")
    suspect = frame[SUSPICION] > threshold
    count = int(suspect.sum())
    if mode == "drop":
        return frame.filter(~suspect), count
    swapped = swap_responses(frame, suspect.to_numpy())
    # swapping back flips the sign of the out-of-fold margin, and the pair is no longer suspect
    return swapped.with_columns(
        pl.when(suspect).then(-pl.col(MARGIN)).otherwise(pl.col(MARGIN)).alias(MARGIN),
        pl.when(suspect).then(1.0 - pl.col(SUSPICION)).otherwise(pl.col(SUSPICION)).alias(SUSPICION),
    ), count


def most_suspect(frame: pl.DataFrame, k: int, *, with_text: bool = False) -> list[dict[str, Any]]:
    """The ``k`` most suspect pairs (most negative margins): ids, margins and suspicion (text only when asked)."""
    columns = [C.PAIR_ID, MARGIN, SUSPICION] + ([C.PROMPT, C.CHOSEN, C.REJECTED] if with_text else [])
    return frame.sort(MARGIN).head(k).select(columns).to_dicts()  # suspicion is decreasing in the margin

