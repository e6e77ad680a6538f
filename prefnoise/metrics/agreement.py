"""Pair outcomes and the agreement they add up to, with its cluster bootstrap interval.

One rule scores a pair everywhere in prefnoise: the right order counts 1, a predicted tie 1/2, the
wrong order 0, and a pair whose reference ties is left out (:func:`pair_outcome`,
:func:`tie_half_accuracy`). A rank check counts outcomes in (split, num, den, count) cells, and a
bootstrap resample of interchangeable units is a multinomial draw over those cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from prefnoise.metrics.names import SPLIT_COL
from prefnoise.metrics.results import Agreement

CONFIDENCE = 0.95
# Bootstrap replicates are drawn this many category-counts at a time, so memory stays flat.
_BOOT_CELLS = 2_000_000
OUTCOME_VALUES = np.array([1.0, 0.5, 0.0, 0.0])  # pair outcome per index: right, predicted tie, wrong, true tie
OUTCOME_DENOMINATORS = np.array([1.0, 1.0, 1.0, 0.0])
NO_PAIR = 4  # outcome index of a pair table's rejected-side record (each pair counted once)


def pair_outcome(pred_margin: pl.Expr, true_margin: pl.Expr) -> pl.Expr:
    """Expression: 1 when the prediction orders a pair like the truth, 0.5 on a predicted tie,
    0 when reversed, null when the truth ties (the pair says nothing about ranking)."""
    agree = pl.when(pred_margin == 0).then(0.5).when((pred_margin > 0) == (true_margin > 0)).then(1.0)
    return pl.when(true_margin == 0).then(None).otherwise(agree.otherwise(0.0))


def tie_half_outcomes(
    margin: np.ndarray | Sequence[float], correct_sign: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """THE project rule for "accuracy"/"agreement" of margins (chosen minus rejected), per pair: a pair
    with the right sign counts 1, a predicted tie (margin 0) counts 1/2, a reversed pair 0, and a pair
    whose reference ties (``correct_sign`` 0) is NaN (left out). ``correct_sign`` (+1/−1 per pair, default
    +1: the labels) scores against another reference, e.g. −1 for flipped pairs. Same rule as
    :func:`pair_outcome` (rank-check)."""
    margin = np.asarray(margin, dtype=np.float64)
    sign = np.ones(len(margin)) if correct_sign is None else np.sign(np.asarray(correct_sign, dtype=np.float64))
    signed = margin * sign
    return np.where(sign == 0, np.nan, (signed > 0) + 0.5 * (signed == 0))


def tie_half_accuracy(
    margin: np.ndarray | Sequence[float], correct_sign: np.ndarray | Sequence[float] | None = None
) -> float:
    """The mean of :func:`tie_half_outcomes` over the pairs left in; NaN when no pair is left."""
    outcomes = tie_half_outcomes(margin, correct_sign)
    kept = outcomes[~np.isnan(outcomes)]
    return float(kept.mean()) if len(kept) else float("nan")


def signed_margin(pred_margin: pl.Expr, true_margin: pl.Expr) -> pl.Expr:
    """Expression: the predicted margin in the direction of the truth (negative = ranked wrong)."""
    return pred_margin * true_margin.sign()


def outcome_index(outcome: pl.Series) -> np.ndarray:
    """Each pair outcome as an index into ``OUTCOME_VALUES``: right, predicted tie, wrong, true tie."""
    return outcome.replace_strict({1.0: 0, 0.5: 1, 0.0: 2}, default=3, return_dtype=pl.Int64).to_numpy()


def pair_cells(counts: np.ndarray, size: int, order: np.ndarray) -> pl.DataFrame:
    """(split, num, den, count) cells from per-code outcome counts, splits numbered in ``order``."""
    table = grow(np.zeros(size * 4, dtype=np.int64), counts).reshape(size, 4)[order]
    return pl.DataFrame(
        {
            SPLIT_COL: np.repeat(np.arange(size), 4),
            "num": np.tile(OUTCOME_VALUES, size),
            "den": np.tile(OUTCOME_DENOMINATORS, size),
            "count": table.reshape(-1),
        }
    ).filter(pl.col("count") > 0)


# --------------------------------------------------------------------------- agreement


def agreements_from_cells(
    cells: pl.DataFrame, n_boot: int, seed: int, n_splits: int, true_ties: np.ndarray | None = None
) -> list[Agreement]:
    """Agreement, bootstrap interval and tie counts per split from (split, num, den, count) cells:
    every unit with the same (num, den) is interchangeable, so a bootstrap resample is exactly a
    multinomial draw over the cells — O(n_boot x cells), not O(n_boot x rows)."""
    result = []
    for split in range(n_splits):
        # Cells in a fixed order: group_by's order varies, and the resamples depend on it.
        part = cells.filter(pl.col(SPLIT_COL) == split).sort("num", "den")
        num = part["num"].to_numpy().astype(float)
        den = part["den"].to_numpy().astype(float)
        count = part["count"].to_numpy().astype(np.int64)
        total_den = float(count @ den)
        value = float(count @ num) / total_den if total_den else None
        if "pties" in part.columns:
            pred_ties = int(part["pties"].sum())
            ties = int(true_ties[split]) if true_ties is not None else 0
        else:
            pred_ties = int(count[(num == 0.5) & (den == 1)].sum())
            ties = int(count[den == 0].sum())
        low, high = _bootstrap_interval(num, den, count, n_boot, seed + split) if value is not None else (None, None)
        result.append(Agreement(value, low, high, int(total_den), ties, pred_ties))
    return result


def _bootstrap_interval(
    num: np.ndarray, den: np.ndarray, count: np.ndarray, n_boot: int, seed: int
) -> tuple[float | None, float | None]:
    """Percentile interval of sum(num)/sum(den) over ``n_boot`` resamples of the units."""
    if n_boot <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    n = int(count.sum())
    probs = count / n
    chunk = max(1, _BOOT_CELLS // max(len(count), 1))
    stats = []
    for start in range(0, n_boot, chunk):
        draws = rng.multinomial(n, probs, size=min(chunk, n_boot - start)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append((draws @ num) / (draws @ den))
    values = np.concatenate(stats)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def grow(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total + values`` for 1-d counts, extended with zeros when ``values`` is longer."""
    if len(values) > len(total):
        total = np.concatenate([total, np.zeros(len(values) - len(total), dtype=total.dtype)])
    total[: len(values)] += values
    return total
