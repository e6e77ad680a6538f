"""Suspicion per pair, the cleaned table (--fix) and the most suspect pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import swap_responses
from prefnoise.noise_audit.estimate import MirrorMixture
from prefnoise.noise_audit.names import CONSENSUS, MARGIN, SUSPICION


def add_suspicion(frame: pl.DataFrame, mixture: MirrorMixture | None) -> pl.DataFrame:
    """``frame`` (with ``oof_margin``) plus ``suspicion`` = P(flipped | margin); null without a mixture
    (ε̂ undetermined: the ranking by margin stands, a calibrated probability does not)."""
    if mixture is None:
        return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(SUSPICION))
    return frame.with_columns(
        pl.Series(SUSPICION, mixture.posterior_flipped(frame[MARGIN].to_numpy()), dtype=pl.Float64)
    )


def flip_votes(values: pl.Series, mask: np.ndarray) -> pl.Series:
    """A vote (or position) column with its votes turned round where ``mask``: chosen ↔ rejected, 1 ↔ −1,
    true ↔ false; ties, nulls and other rows stay (the votes keep naming the same responses after a swap)."""
    flip = pl.Series(np.asarray(mask, dtype=bool))
    if values.dtype == pl.Boolean:
        turned = ~values
    elif values.dtype.is_numeric():
        turned = -values
    else:
        lower = values.cast(pl.String).str.strip_chars().str.to_lowercase()
        turned = pl.select(
            pl.when(lower == "chosen").then(pl.lit("rejected")).when(lower == "rejected").then(pl.lit("chosen"))
            .otherwise(values.cast(pl.String))
        ).to_series()
        if values.dtype != pl.String:
            values = values.cast(pl.String)
    return pl.select(pl.when(flip).then(turned).otherwise(values)).to_series().alias(values.name)


def clean_table(
    frame: pl.DataFrame, *, mode: str, threshold: float = 0.5, vote_columns: tuple[str, ...] = ()
) -> tuple[pl.DataFrame, int]:
    """Drop or swap back the pairs whose suspicion exceeds ``threshold``; return the table and how many.
    A swap also turns round what is said relative to the orientation: ``oof_margin``, ``suspicion``,
    ``consensus`` and the ``vote_columns`` (annotators, position)."""
    if mode not in ("drop", "swap"):
        raise PrefnoiseError(f"--fix must be 'drop' or 'swap', got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise PrefnoiseError(f"--threshold must be within [0, 1], got {threshold}")
    suspect = (frame[SUSPICION] > threshold).fill_null(False)
    count = int(suspect.sum())
    if mode == "drop":
        return frame.filter(~suspect), count
    swapped = swap_responses(frame, suspect.to_numpy())
    # swapping back flips the sign of the out-of-fold margin, and the pair is no longer suspect
    turned = [pl.when(suspect).then(1.0 - pl.col(SUSPICION)).otherwise(pl.col(SUSPICION)).alias(SUSPICION)]
    if MARGIN in frame.columns:
        turned.append(pl.when(suspect).then(-pl.col(MARGIN)).otherwise(pl.col(MARGIN)).alias(MARGIN))
    if CONSENSUS in frame.columns:
        turned.append(flip_votes(frame[CONSENSUS], suspect.to_numpy()))
    turned += [flip_votes(frame[name], suspect.to_numpy()) for name in vote_columns]
    return swapped.with_columns(turned), count


def most_suspect(frame: pl.DataFrame, k: int, *, with_text: bool = False) -> list[dict[str, Any]]:
    """The ``k`` most suspect pairs: ids, margins and suspicion (most negative margins first), or without
    margins (annotators) suspicion and consensus (most suspect first); text only when asked."""
    text = [C.PROMPT, C.CHOSEN, C.REJECTED] if with_text else []
    if MARGIN not in frame.columns:
        ranked = frame.sort(SUSPICION, descending=True, nulls_last=True, maintain_order=True)
        margin = pl.lit(None, dtype=pl.Float64).alias(MARGIN)  # the JSON contract's key: no margin here
        return ranked.head(k).select([C.PAIR_ID, margin, SUSPICION, CONSENSUS, *text]).to_dicts()
    columns = [C.PAIR_ID, MARGIN, SUSPICION, *text]
    return frame.sort(MARGIN).head(k).select(columns).to_dicts()  # suspicion is decreasing in the margin
