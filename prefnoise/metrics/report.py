"""The public rank metrics: one full report (:func:`rank_report`) and each metric on its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.data import score_hint
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics.agreement import agreements_from_cells, outcome_index, pair_cells
from prefnoise.metrics.builder import MapBuckets, ReportBuilder
from prefnoise.metrics.names import PRED_COL, TRUE_COL, Frame
from prefnoise.metrics.rankstats import rank_stats, tau_b
from prefnoise.metrics.results import Agreement, Preservation, RankReport
from prefnoise.metrics.tables import (
    check_reward_types,
    detect_layout,
    long_columns,
    long_responses,
    pair_frame,
    pair_outcomes,
    per_prompt_stats,
)
from prefnoise.metrics.totals import PromptTotals, dense_codes

# Responses a report holds in memory at once (about 300 MB of working arrays); more spill to disk.
DEFAULT_MEMORY_RESPONSES = 1_000_000
_READ_ROWS = 1 << 18  # input rows per batch


def pairwise_agreement(
    frame: Frame,
    *,
    pred: str = C.REWARD,
    true: str | None = C.SCORE,
    n_boot: int = 1000,
    seed: int = C.DEFAULT_SEED,
) -> Agreement:
    """Agreement of a pair table's predicted order with the true order (or the labels when
    ``true`` is None), with a seeded bootstrap 95% interval that resamples prompts (clusters of
    pairs; each pair is its own cluster when the table has no ``prompt`` column)."""
    outcomes = pair_outcomes(frame.lazy(), pred, true).collect()
    index = outcome_index(outcomes["_outcome"])
    if C.PROMPT not in outcomes.columns:
        counts = np.bincount(index)
        return agreements_from_cells(pair_cells(counts, 1, np.zeros(1, dtype=np.int64)), n_boot, seed, 1)[0]
    totals = PromptTotals([1])
    group = outcomes[C.PROMPT].hash(seed=1).to_numpy()
    totals.add_pair_outcomes(0, dense_codes(group), index, 1)
    return totals.agreements(0, np.zeros(1, dtype=np.int64), n_boot, seed, pairs=True)[0]


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between two equal-length arrays (NaN when either is constant); O(n log n)."""
    stats = rank_stats((np.zeros(len(x), dtype=np.int64),), np.asarray(x, float), np.asarray(y, float))
    return float(tau_b(stats)[0])


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either array is constant."""
    stats = rank_stats((np.zeros(len(x), dtype=np.int64),), np.asarray(x, float), np.asarray(y, float))
    return float(stats["rho"][0])


def rank_preservation(frame: Frame, *, pred: str = C.REWARD, true: str = C.SCORE) -> Preservation:
    """Fraction of prompts of a long table (``prompt_id``, ``pred``, ``true``) whose predicted
    reward keeps every strict true order between two of its responses (paper Sec. 4.1)."""
    stats = per_prompt_stats(long_responses(frame.lazy(), pred, true).collect())
    totals = PromptTotals([1])
    totals.add_prompts(0, stats, 1)
    return totals.preservations(0, np.zeros(1, dtype=np.int64))[0]


def rank_report(
    data: Frame,
    *,
    pred: str = C.REWARD,
    true: str | None = None,
    group_by: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = C.DEFAULT_SEED,
    worst: int = 0,
    layout: str = "auto",
    memory_responses: int = DEFAULT_MEMORY_RESPONSES,
    temp_dir: str | Path | None = None,
    on_progress: Callable[[int], None] | None = None,
    map_buckets: MapBuckets | None = None,
    min_buckets: int = 1,
    name: str = "data",
) -> RankReport:
    """Every rank metric of ``data`` (pair or long table), overall and split by ``flipped`` (when
    present) and by each ``group_by`` column, plus the ``worst`` most wrongly ranked pairs.

    Reads only the columns it needs, in batches, and holds about ``memory_responses`` responses
    at a time (larger tables spill to buckets under ``temp_dir``). ``on_progress`` receives
    percentage points of the work as they are done (100 in all). ``map_buckets`` and ``min_buckets``
    let an engine compute the prompt buckets' partial statistics on its workers (see
    :class:`~prefnoise.metrics.builder.ReportBuilder`); the report is the same to 1e-12. ``name``: the input
    in messages (a table without one usable row is a PrefnoiseError naming it and its first skipped row).

    ``true`` names the true reward; None means the default ``score``, and a pair table without
    ``chosen_score``/``rejected_score`` then falls back to the labels as the reference (the report's
    ``reference`` and ``note`` say so). A ``true`` given by name must exist: a pair table lacking
    ``chosen_<true>``/``rejected_<true>`` is a PrefnoiseError, so a misspelt --true cannot silently
    compare against the labels. (``true="score"`` is treated like the default until the CLI passes
    None for an unset --true.)
    """
    if memory_responses < 1:
        raise PrefnoiseError(f"memory_responses must be at least 1 (got {memory_responses})")
    lazy = data.lazy()
    schema = lazy.collect_schema()
    names = schema.names()
    layout = detect_layout(names, pred, layout)
    splits = list(dict.fromkeys([*([C.FLIPPED] if C.FLIPPED in names else []), *group_by]))
    _check_columns(schema, layout, pred, C.SCORE if true is None else true, splits, worst)
    projected, reference_true, note = _projection(lazy, names, layout, pred, true, splits, worst)
    rows = projected.select(pl.len()).collect().item()
    with ReportBuilder(
        layout, reference_true is not None, splits, worst, rows, memory_responses, temp_dir, on_progress,
        map_buckets, min_buckets, name=name, sources=_sources(layout, pred, reference_true),
    ) as builder:
        for batch in projected.collect_batches(chunk_size=_READ_ROWS):
            builder.add_rows(batch)
        report = builder.report(pred=pred, true=reference_true, n_boot=n_boot, seed=seed)
    if note is not None:
        report.note = note
    return report


def _check_columns(schema: pl.Schema, layout: str, pred: str, true: str, splits: list[str], worst: int) -> None:
    """PrefnoiseError unless the split columns exist and hold single values, the rewards are numeric,
    and the pair ids (shown with ``worst``) are text or integers."""
    names = schema.names()
    missing = [name for name in splits if name not in names]
    if missing:
        raise PrefnoiseError(f"--group-by column {missing[0]!r} not in the data; columns are {', '.join(names)}")
    check_reward_types(schema, layout, pred, true)
    for name in splits:
        if schema[name].is_nested() or schema[name] in (pl.Binary, pl.Object):
            raise PrefnoiseError(
                f"--group-by {name}: column {name!r} has type {schema[name]}; it needs a column of single "
                "values (numbers, booleans or text) to split by"
            )
    if worst > 0 and C.PAIR_ID in names and schema[C.PAIR_ID].is_nested():
        raise PrefnoiseError(f"column 'pair_id' has type {schema[C.PAIR_ID]}; expected text or integer ids")


def _sources(layout: str, pred: str, true: str | None) -> dict[str, str]:
    """Each projected column's column in the input (for messages)."""
    if layout != "pairs":
        return {PRED_COL: pred, TRUE_COL: C.SCORE if true is None else true}
    named = {"_pc": C.chosen(pred), "_pr": C.rejected(pred), "_id": C.PAIR_ID}
    return named | ({"_tc": C.chosen(true), "_tr": C.rejected(true)} if true is not None else {})


def _projection(
    lazy: pl.LazyFrame, names: list[str], layout: str, pred: str, true: str | None, splits: list[str], worst: int
) -> tuple[pl.LazyFrame, str | None, str | None]:
    """The projected input, the true reward it compares against (None: the labels) and a note saying
    why the labels are the reference. ``true`` None means the default ``score``, optional in a pair
    table; a named ``true`` must exist."""
    explicit = true is not None
    true = C.SCORE if true is None else true
    if layout != "pairs":
        if true not in names:
            raise PrefnoiseError(
                f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}. "
                "Use --true to name it"
            )
        return lazy.with_row_index("_row").select(long_columns(pred, true, splits)), true, None
    has_true = C.chosen(true) in names and C.rejected(true) in names
    halves = [c for c in (C.chosen(true), C.rejected(true)) if c in names]
    if not has_true and (explicit or halves):
        missing_true = [c for c in (C.chosen(true), C.rejected(true)) if c not in names]
        raise PrefnoiseError(
            f"--true {true}: no column {' or '.join(repr(c) for c in missing_true)} in the pair table; "
            f"columns are {', '.join(names)}. Name the true reward field (chosen_<f>/rejected_<f>) "
            "or leave --true unset to compare against the labels"
        )
    reference_true = true if has_true else None
    hint = "" if has_true else score_hint(lazy.collect_schema())
    note = None if has_true else f"no {C.chosen(true)}/{C.rejected(true)} columns: the labels are the reference{hint}"
    return pair_frame(lazy, names, pred, reference_true, splits, pair_ids=worst > 0), reference_true, note
