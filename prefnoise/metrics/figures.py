"""The data behind a rank-check figure: rewards per response and outcomes per pair."""

from __future__ import annotations

import polars as pl

from prefnoise import columns as C
from prefnoise.metrics.agreement import pair_outcome
from prefnoise.metrics.names import PRED_COL, PROMPT_COL, TRUE_COL, Frame
from prefnoise.metrics.tables import check_reward_types, detect_layout, finite_rows, long_columns


def figure_frames(
    data: Frame, *, pred: str = C.REWARD, true: str = C.SCORE, layout: str = "auto", max_rows: int = 200_000
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two frames for a figure (at most ``max_rows`` rows each): per response (``true``, ``pred``;
    for labels only: ``rejected``, ``chosen`` predicted rewards) and per pair (``true_margin``,
    ``outcome`` = 1 / 0.5 / 0, truth ties left out)."""
    lazy = data.lazy()
    schema = lazy.collect_schema()
    names = schema.names()
    layout = detect_layout(names, pred, layout)
    if layout == "pairs":
        has_true = C.chosen(true) in names and C.rejected(true) in names
        check_reward_types(schema, layout, pred, true if has_true else None)
        rewards = [C.chosen(pred), C.rejected(pred)] + ([C.chosen(true), C.rejected(true)] if has_true else [])
        head = lazy.with_columns(pl.col(rewards).cast(pl.Float64)).filter(finite_rows(*rewards)).head(max_rows)
        if has_true:
            points = pl.concat(
                [
                    head.select(pl.col(C.chosen(true)).alias("true"), pl.col(C.chosen(pred)).alias("pred")),
                    head.select(pl.col(C.rejected(true)).alias("true"), pl.col(C.rejected(pred)).alias("pred")),
                ]
            )
            true_margin = pl.col(C.chosen(true)) - pl.col(C.rejected(true))
        else:
            points = head.select(pl.col(C.rejected(pred)).alias("rejected"), pl.col(C.chosen(pred)).alias("chosen"))
            true_margin = pl.lit(1.0)
        pairs = head.select(
            true_margin.cast(pl.Float64).alias("true_margin"),
            pair_outcome(pl.col(C.chosen(pred)) - pl.col(C.rejected(pred)), true_margin).alias("outcome"),
        )
    else:
        check_reward_types(schema, layout, pred, true)
        rows = (
            lazy.with_row_index("_row")
            .select(long_columns(pred, true, []))
            .filter(finite_rows(TRUE_COL, PRED_COL))
            .head(max_rows)
        )
        points = rows.select(pl.col(TRUE_COL).alias("true"), pl.col(PRED_COL).alias("pred"))
        true_margin = pl.col(TRUE_COL) - pl.col(f"{TRUE_COL}_b")
        pairs = (
            rows.join(rows, on=PROMPT_COL, suffix="_b")
            .filter(pl.col(TRUE_COL) > pl.col(f"{TRUE_COL}_b"))
            .select(
                true_margin.alias("true_margin"),
                pair_outcome(pl.col(PRED_COL) - pl.col(f"{PRED_COL}_b"), true_margin).alias("outcome"),
            )
        )
    return points.drop_nulls().collect(), pairs.drop_nulls().head(max_rows).collect()
