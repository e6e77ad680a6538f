"""The input of a rank check: which layout a table has, and its projection to what the metrics read.

A **pair table** has ``chosen_<pred>``/``rejected_<pred>`` (and ``chosen_<true>``/``rejected_<true>``
when a true reward exists); a **long table** has ``prompt_id``, ``<pred>`` and ``<true>``, one row
per response.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics.agreement import pair_outcome
from prefnoise.metrics.names import PRED_COL, PROMPT_COL, PROMPT_ID, SPLIT_COL, TRUE_COL
from prefnoise.metrics.rankstats import rank_stats


def detect_layout(names: Sequence[str], pred: str = C.REWARD, layout: str = "auto") -> str:
    """'pairs' when ``chosen_<pred>``/``rejected_<pred>`` exist, 'long' when ``prompt_id`` and
    ``<pred>`` do; checks an explicit ``layout`` against the columns."""
    pair_ok = C.chosen(pred) in names and C.rejected(pred) in names
    long_ok = PROMPT_ID in names and pred in names
    if layout not in ("auto", "pairs", "long"):
        raise PrefnoiseError(f"unknown layout {layout!r}; choose auto, pairs or long")
    if layout == "auto":
        layout = "pairs" if pair_ok else "long" if long_ok else ""
    if layout == "pairs" and not pair_ok:
        raise PrefnoiseError(
            f"pair table needs columns {C.chosen(pred)!r} and {C.rejected(pred)!r} (run `prefnoise score` "
            f"first, or name the reward with --pred); columns are {', '.join(names)}"
        )
    if layout == "long" and not long_ok:
        raise PrefnoiseError(f"long table needs columns {PROMPT_ID!r} and {pred!r}; columns are {', '.join(names)}")
    if not layout:
        raise PrefnoiseError(
            f"no predicted reward found: expected {C.chosen(pred)!r}/{C.rejected(pred)!r} (pair table) or "
            f"{PROMPT_ID!r} + {pred!r} (long table); columns are {', '.join(names)}. Use --pred to name it"
        )
    return layout


def check_reward_types(schema: pl.Schema, layout: str, pred: str, true: str | None) -> None:
    """PrefnoiseError unless the predicted (and, when present, the true) reward columns hold numbers."""
    flags = [("--pred", pred)] + ([("--true", true)] if true else [])
    for flag, field_name in flags:
        columns = [C.chosen(field_name), C.rejected(field_name)] if layout == "pairs" else [field_name]
        for column in columns:
            dtype = schema.get(column)
            if dtype is None or dtype.is_numeric() or dtype in (pl.Boolean, pl.Null):
                continue
            raise PrefnoiseError(
                f"{flag} {field_name}: column {column!r} has type {dtype}; a reward needs a numeric column "
                "(one number per response)"
            )


def finite_rows(*columns: str) -> pl.Expr:
    """Expression: every one of ``columns`` is a finite number (null counts as not)."""
    return pl.all_horizontal([pl.col(c).is_finite().fill_null(False) for c in columns])


def pair_frame(
    lazy: pl.LazyFrame, names: list[str], pred: str, true: str | None, splits: list[str], pair_ids: bool = True
) -> pl.LazyFrame:
    """Project a pair table to what the metrics need: hashed text, margins' inputs, split keys,
    and the pair ids when ``pair_ids`` (only the worst-pairs list shows them)."""
    wanted = [C.PROMPT, C.CHOSEN, C.REJECTED] if true else [C.PROMPT]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise PrefnoiseError(f"pair table: column {missing[0]!r} missing; columns are {', '.join(names)}")
    cols = [
        pl.col(C.PROMPT).hash(seed=1).alias(PROMPT_COL),
        pl.col(C.chosen(pred)).cast(pl.Float64).alias("_pc"),
        pl.col(C.rejected(pred)).cast(pl.Float64).alias("_pr"),
    ]
    if pair_ids:
        if C.PAIR_ID not in names:
            lazy = lazy.with_row_index(C.PAIR_ID)
        cols.append(pl.col(C.PAIR_ID).cast(pl.String).alias("_id"))
    if true:
        cols += [
            pl.col(C.chosen(true)).cast(pl.Float64).alias("_tc"),
            pl.col(C.rejected(true)).cast(pl.Float64).alias("_tr"),
            pl.col(C.CHOSEN).hash(seed=2).alias("_hc"),
            pl.col(C.REJECTED).hash(seed=2).alias("_hr"),
        ]
    cols += [_split_column(name) for name in splits]
    return lazy.select(cols)


def long_columns(pred: str, true: str, splits: Sequence[str]) -> list[pl.Expr]:
    """A long table's projection (after ``with_row_index("_row")``)."""
    return [
        pl.col(PROMPT_ID).hash(seed=1).alias(PROMPT_COL),
        pl.col(pred).cast(pl.Float64).alias(PRED_COL),
        pl.col(true).cast(pl.Float64).alias(TRUE_COL),
        pl.col("_row").cast(pl.Int64),
        *[_split_column(name) for name in splits],
    ]


def _split_column(name: str) -> pl.Expr:
    """A split column as text, nulls spelled "null", so every row belongs to a split."""
    return pl.col(name).cast(pl.String).fill_null("null")


def pair_outcomes(lazy: pl.LazyFrame, pred: str, true: str | None) -> pl.LazyFrame:
    """Each pair's outcome (see :func:`pair_outcome`) from a raw pair table (for the public
    single-metric function)."""
    schema = lazy.collect_schema()
    names = schema.names()
    detect_layout(names, pred, "pairs")
    has = true is not None and C.chosen(true) in names
    check_reward_types(schema, "pairs", pred, true if has else None)
    rewards = [C.chosen(pred), C.rejected(pred)] + ([C.chosen(true), C.rejected(true)] if has else [])  # type: ignore[arg-type]
    prompt = [C.PROMPT] if C.PROMPT in names else []
    frame = lazy.select(*prompt, pl.col(rewards).cast(pl.Float64)).filter(finite_rows(*rewards))
    frame = frame.select(
        *prompt,
        (pl.col(C.chosen(pred)) - pl.col(C.rejected(pred))).alias("_pm"),
        (pl.col(C.chosen(true)) - pl.col(C.rejected(true))).alias("_tm")  # type: ignore[arg-type]
        if has
        else pl.lit(1.0).alias("_tm"),
    )
    return frame.select(*prompt, pair_outcome(pl.col("_pm"), pl.col("_tm")).alias("_outcome"))


def long_responses(lazy: pl.LazyFrame, pred: str, true: str) -> pl.LazyFrame:
    """A raw long table's finite responses, projected, all in split 0 (for the public single-metric function)."""
    schema = lazy.collect_schema()
    names = schema.names()
    detect_layout(names, pred, "long")
    if true not in names:
        raise PrefnoiseError(f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}")
    check_reward_types(schema, "long", pred, true)
    frame = lazy.with_row_index("_row").select(long_columns(pred, true, [])).filter(finite_rows(TRUE_COL, PRED_COL))
    return frame.with_columns(pl.lit(0, dtype=pl.Int64).alias(SPLIT_COL))


def per_prompt_stats(responses: pl.DataFrame) -> dict[str, np.ndarray]:
    """Rank statistics per (split, prompt), with a "split" array naming each prompt's split."""
    keys = (responses[SPLIT_COL].to_numpy().astype(np.int64), responses[PROMPT_COL].to_numpy())
    return rank_stats(keys, responses[TRUE_COL].to_numpy(), responses[PRED_COL].to_numpy())
