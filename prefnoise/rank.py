"""Rank metrics: does a learned reward order responses like the true reward does?

The paper (Nishimori et al. 2025, Sec. 4.1) calls a reward r *rank-preserving* with respect to the
true reward r* when, for every prompt and every two responses a, a', r*(a) > r*(a') implies
r(a) > r(a'). This module measures how close a reward comes to that, on two input shapes:

* the canonical **pair table** (one row per pair; predicted ``chosen_<pred>``/``rejected_<pred>``,
  reference ``chosen_<true>``/``rejected_<true>``, or the labels themselves when no true reward
  exists: the chosen response is then taken as the better one);
* a **long table** of responses: ``prompt_id``, ``<pred>``, ``<true>`` (k responses per prompt,
  UltraFeedback style); its pairs are all pairs of responses under one prompt.

A report streams the input once in batches and holds at most about ``memory_responses``
responses at a time, whatever the table's size:

1. each batch adds to the pair outcome counts (agreement, its bootstrap) and the worst-pair
   candidates, and its responses go to buckets by a hash of their prompt;
2. each prompt bucket gives the per-prompt statistics (preservation, per-prompt tau and rho,
   a long table's agreement) and sends its responses on to buckets by ranges of the true reward;
3. Kendall's tau-b and Spearman's rho over all responses are then combined from two passes over
   reward-value buckets (:mod:`prefnoise.global_ranks`; :mod:`prefnoise.rankstats` sorts inside
   a bucket): pairs within a true-reward bucket are counted exactly there and each response gets
   its global true rank; the responses then move to buckets by the predicted reward, where pairs
   within a bucket are counted exactly, pairs across buckets by a running count of earlier
   buckets, and each response gets its global predicted rank.

With one bucket (a table that fits) nothing touches the disk and step 3 is one in-memory pass.
Each cut point between reward ranges has a bucket of its own, streamed in chunks (its responses
all tie), so a discrete score held by millions of responses stays within the budget; only a
single prompt with more responses than the budget makes a bucket larger than it.

For a pair table, "all responses" means the pairs reshaped to one row per response, keeping the
first row of each (split, prompt, response text) — a response that appears in several pairs of a
prompt is counted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.data import score_hint
from prefnoise.errors import PrefnoiseError
from prefnoise.global_ranks import GlobalRanks, cut_points, value_bucket
from prefnoise.rankstats import Orders, grouped_stats, orders, rank_stats, tau_b
from prefnoise.spill import Buckets

PROMPT_ID = "prompt_id"  # the long table's prompt key
LONG_REQUIRED = (PROMPT_ID,)
CONFIDENCE = 0.95
# Responses a report holds in memory at once (about 300 MB of working arrays); more spill to disk.
DEFAULT_MEMORY_RESPONSES = 1_000_000
# Bootstrap replicates are drawn this many category-counts at a time, so memory stays flat.
_BOOT_CELLS = 2_000_000
_READ_ROWS = 1 << 18  # input rows per batch
_SAMPLE = 200_000  # responses sampled to choose the reward ranges of the buckets
_OUTCOMES = np.array([1.0, 0.5, 0.0, 0.0])  # pair outcome per index: right, predicted tie, wrong, true tie
_OUTCOME_DEN = np.array([1.0, 1.0, 1.0, 0.0])
_NO_PAIR = 4  # outcome index of a pair table's rejected-side record (each pair counted once)

# Internal column names of the projected input.
_G, _P, _X, _Y = "_split", "_prompt", "_true", "_pred"

Frame = pl.DataFrame | pl.LazyFrame


# --------------------------------------------------------------------------- results


@dataclass
class Agreement:
    """Pairwise rank agreement: correctly ordered pairs (prediction ties count half)."""

    value: float | None
    low: float | None
    high: float | None
    pairs: int  # pairs with a strict true order (the denominator)
    true_ties: int  # pairs excluded because the truth ties
    pred_ties: int  # pairs the prediction ties (counted as half right)


@dataclass
class Preservation:
    """Per-prompt rank preservation: fraction of prompts whose every strict true order is kept."""

    value: float | None
    prompts: int  # prompts with at least one strictly ordered pair (the denominator)
    preserved: int
    unordered_prompts: int  # prompts whose responses all tie in the truth (excluded)


@dataclass
class RankMetrics:
    """Every metric for one subset of the data (the whole table, or one value of a split column)."""

    rows: int
    agreement: Agreement
    preservation: Preservation
    responses: int | None = None
    prompts: int | None = None
    kendall_tau_b: float | None = None
    spearman_rho: float | None = None
    kendall_tau_b_per_prompt: float | None = None  # mean over prompts where it is defined
    spearman_rho_per_prompt: float | None = None
    prompts_with_tau: int | None = None


@dataclass
class RankReport:
    """A rank check: overall metrics, metrics per split value, worst pairs; ``to_dict`` for JSON."""

    layout: str  # "pairs" or "long"
    reference: str  # "score" (a true reward) or "labels"
    pred: str
    true: str | None
    overall: RankMetrics
    splits: dict[str, dict[str, RankMetrics]] = field(default_factory=dict)
    worst: list[dict[str, Any]] = field(default_factory=list)
    dropped_rows: int = 0  # rows skipped: a predicted or reference reward is null, NaN or infinite
    n_boot: int = 0
    seed: int = C.DEFAULT_SEED
    note: str | None = None  # e.g. why the labels are the reference
    interval: str = ""  # how the agreement intervals were resampled

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return asdict(self)


# --------------------------------------------------------------------------- expressions


def pair_outcome(pred_margin: pl.Expr, true_margin: pl.Expr) -> pl.Expr:
    """Expression: 1 when the prediction orders a pair like the truth, 0.5 on a predicted tie,
    0 when reversed, null when the truth ties (the pair says nothing about ranking)."""
    agree = pl.when(pred_margin == 0).then(0.5).when((pred_margin > 0) == (true_margin > 0)).then(1.0)
    return pl.when(true_margin == 0).then(None).otherwise(agree.otherwise(0.0))


def tie_half_accuracy(
    margin: np.ndarray | Sequence[float], correct_sign: np.ndarray | Sequence[float] | None = None
) -> float:
    """THE project rule for "accuracy"/"agreement" of margins (chosen minus rejected): a pair with
    the right sign counts 1, a predicted tie (margin 0) counts 1/2, a reversed pair 0; pairs whose
    reference ties (``correct_sign`` 0) are left out. ``correct_sign`` (+1/−1 per pair, default +1:
    the labels) scores against another reference, e.g. −1 for flipped pairs. NaN when no pair is
    left. Same rule as :func:`pair_outcome` (rank-check)."""
    margin = np.asarray(margin, dtype=np.float64)
    sign = np.ones(len(margin)) if correct_sign is None else np.sign(np.asarray(correct_sign, dtype=np.float64))
    keep = sign != 0
    if not keep.any():
        return float("nan")
    signed = margin[keep] * sign[keep]
    return float(((signed > 0) + 0.5 * (signed == 0)).mean())


def signed_margin(pred_margin: pl.Expr, true_margin: pl.Expr) -> pl.Expr:
    """Expression: the predicted margin in the direction of the truth (negative = ranked wrong)."""
    return pred_margin * true_margin.sign()


# --------------------------------------------------------------------------- public metrics


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
    outcomes = _pair_outcomes(frame.lazy(), pred, true).collect()
    index = _outcome_index(outcomes["_outcome"])
    if C.PROMPT not in outcomes.columns:
        counts = np.bincount(index)
        return _agreements(_pair_cells(counts, 1, np.zeros(1, dtype=np.int64)), n_boot, seed, 1)[0]
    totals = _PromptTotals([1])
    group = outcomes[C.PROMPT].hash(seed=1).to_numpy()
    totals.add_pair_outcomes(0, _dense(group), index, 1)
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
    stats = _per_prompt_stats(_long_responses(frame.lazy(), pred, true).collect())
    totals = _PromptTotals([1])
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
) -> RankReport:
    """Every rank metric of ``data`` (pair or long table), overall and split by ``flipped`` (when
    present) and by each ``group_by`` column, plus the ``worst`` most wrongly ranked pairs.

    Reads only the columns it needs, in batches, and holds about ``memory_responses`` responses
    at a time (larger tables spill to buckets under ``temp_dir``). ``on_progress`` receives
    percentage points of the work as they are done (100 in all).

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
    explicit = true is not None
    true = C.SCORE if true is None else true
    splits = list(dict.fromkeys([*([C.FLIPPED] if C.FLIPPED in names else []), *group_by]))
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
    if layout == "pairs":
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
        if not has_true:
            note = f"no {C.chosen(true)}/{C.rejected(true)} columns: the labels are the reference{score_hint(schema)}"
        projected = _pair_frame(lazy, names, pred, reference_true, splits, pair_ids=worst > 0)
    else:
        if true not in names:
            raise PrefnoiseError(
                f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}. "
                "Use --true to name it"
            )
        reference_true = true
        projected = lazy.with_row_index("_row").select(_long_columns(pred, true, splits))
    rows = projected.select(pl.len()).collect().item()
    with _ReportBuilder(
        layout, reference_true is not None, splits, worst, rows, memory_responses, temp_dir, on_progress
    ) as builder:
        for batch in projected.collect_batches(chunk_size=_READ_ROWS):
            builder.add_rows(batch)
        report = builder.report(pred=pred, true=reference_true, n_boot=n_boot, seed=seed)
    if layout == "pairs" and reference_true is None:
        report.note = note
    return report


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


def _finite(*columns: str) -> pl.Expr:
    """Expression: every one of ``columns`` is a finite number (null counts as not)."""
    return pl.all_horizontal([pl.col(c).is_finite().fill_null(False) for c in columns])


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


# --------------------------------------------------------------------------- frames


def _pair_frame(
    lazy: pl.LazyFrame, names: list[str], pred: str, true: str | None, splits: list[str], pair_ids: bool = True
) -> pl.LazyFrame:
    """Project a pair table to what the metrics need: hashed text, margins' inputs, split keys,
    and the pair ids when ``pair_ids`` (only the worst-pairs list shows them)."""
    wanted = [C.PROMPT, C.CHOSEN, C.REJECTED] if true else [C.PROMPT]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise PrefnoiseError(f"pair table: column {missing[0]!r} missing; columns are {', '.join(names)}")
    cols = [
        pl.col(C.PROMPT).hash(seed=1).alias(_P),
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


def _long_columns(pred: str, true: str, splits: Sequence[str]) -> list[pl.Expr]:
    """A long table's projection (after ``with_row_index("_row")``)."""
    return [
        pl.col(PROMPT_ID).hash(seed=1).alias(_P),
        pl.col(pred).cast(pl.Float64).alias(_Y),
        pl.col(true).cast(pl.Float64).alias(_X),
        pl.col("_row").cast(pl.Int64),
        *[_split_column(name) for name in splits],
    ]


def _split_column(name: str) -> pl.Expr:
    """A split column as text, nulls spelled "null", so every row belongs to a split."""
    return pl.col(name).cast(pl.String).fill_null("null")


def _pair_outcomes(lazy: pl.LazyFrame, pred: str, true: str | None) -> pl.LazyFrame:
    """Each pair's outcome (see :func:`pair_outcome`) from a raw pair table (for the public
    single-metric function)."""
    schema = lazy.collect_schema()
    names = schema.names()
    detect_layout(names, pred, "pairs")
    has = true is not None and C.chosen(true) in names
    check_reward_types(schema, "pairs", pred, true if has else None)
    rewards = [C.chosen(pred), C.rejected(pred)] + ([C.chosen(true), C.rejected(true)] if has else [])  # type: ignore[arg-type]
    prompt = [C.PROMPT] if C.PROMPT in names else []
    frame = lazy.select(*prompt, pl.col(rewards).cast(pl.Float64)).filter(_finite(*rewards))
    frame = frame.select(
        *prompt,
        (pl.col(C.chosen(pred)) - pl.col(C.rejected(pred))).alias("_pm"),
        (pl.col(C.chosen(true)) - pl.col(C.rejected(true))).alias("_tm")  # type: ignore[arg-type]
        if has
        else pl.lit(1.0).alias("_tm"),
    )
    return frame.select(*prompt, pair_outcome(pl.col("_pm"), pl.col("_tm")).alias("_outcome"))


def _long_responses(lazy: pl.LazyFrame, pred: str, true: str) -> pl.LazyFrame:
    schema = lazy.collect_schema()
    names = schema.names()
    detect_layout(names, pred, "long")
    if true not in names:
        raise PrefnoiseError(f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}")
    check_reward_types(schema, "long", pred, true)
    frame = lazy.with_row_index("_row").select(_long_columns(pred, true, [])).filter(_finite(_X, _Y))
    return frame.with_columns(pl.lit(0, dtype=pl.Int64).alias(_G))


def _per_prompt_stats(responses: pl.DataFrame) -> dict[str, np.ndarray]:
    """Rank statistics per (split, prompt), with a "split" array naming each prompt's split."""
    keys = (responses[_G].to_numpy().astype(np.int64), responses[_P].to_numpy())
    return rank_stats(keys, responses[_X].to_numpy(), responses[_Y].to_numpy())


# --------------------------------------------------------------------------- the streaming report


class _SplitCodes:
    """Codes for one split column's values in order of first appearance (sorted at the end)."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.labels: list[Any] = [None] if name is None else []
        self._code: dict[Any, int] = {}

    def encode(self, batch: pl.DataFrame) -> np.ndarray:
        if self.name is None:
            return np.zeros(batch.height, dtype=np.int32)
        values = batch[self.name]
        for value in values.unique(maintain_order=True).to_list():
            if value not in self._code:
                self._code[value] = len(self.labels)
                self.labels.append(value)
        return values.replace_strict(self._code, return_dtype=pl.Int32).to_numpy()

    def sorted_codes(self) -> np.ndarray:
        """The codes in the order of their sorted labels."""
        return np.array(sorted(range(len(self.labels)), key=lambda code: self.labels[code]), dtype=np.int64)


def _grow(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total + values`` for 1-d counts, extended with zeros when ``values`` is longer."""
    if len(values) > len(total):
        total = np.concatenate([total, np.zeros(len(values) - len(total), dtype=total.dtype)])
    total[: len(values)] += values
    return total


def _dense(values: np.ndarray) -> np.ndarray:
    """Dense int64 codes (0..k-1) of ``values``, in sorted order of the values."""
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


class _Progress:
    """Percentage points of a report, stage by stage (each stage has a weight)."""

    def __init__(self, callback: Callable[[int], None] | None, weights: Sequence[int]) -> None:
        self.callback, self.weights = callback, list(weights)
        self.sent = 0

    def at(self, stage: int, fraction: float) -> None:
        if self.callback is None:
            return
        target = round(sum(self.weights[:stage]) + self.weights[stage] * min(fraction, 1.0))
        if target > self.sent:
            self.callback(target - self.sent)
            self.sent = target


class _ReportBuilder:
    """One report's state: counts from the streamed rows, the buckets, the statistics per split
    column (index 0 is the whole table, then each split column; codes per column as read)."""

    def __init__(
        self,
        layout: str,
        has_true: bool,
        splits: list[str],
        worst: int,
        rows: int,
        memory_responses: int,
        temp_dir: str | Path | None,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.layout, self.has_true, self.worst, self.rows_expected = layout, has_true, worst, rows
        self.temp_dir, self.memory_responses = temp_dir, memory_responses
        self.responses_expected = rows * (2 if layout == "pairs" and has_true else 1)
        self.n_buckets = n_buckets = max(1, math.ceil(self.responses_expected / memory_responses))
        self.coders = [_SplitCodes(None)] + [_SplitCodes(name) for name in splits]
        self.columns = range(len(self.coders))
        self.rows = [np.zeros(0, dtype=np.int64) for _ in self.columns]
        self.cells = [np.zeros(0, dtype=np.int64) for _ in self.columns]  # pair outcomes: code * 4 + outcome
        self.dropped = self.rows_read = self.clean_rows = 0
        self.worst_frames: list[pl.DataFrame] = []
        self.samples: dict[str, list[np.ndarray]] = {"x": [], "y": []}
        self.stack = ExitStack()
        fields = [("prompt", "u8")] + [(f"c{j}", "i4") for j in self.columns if j]
        if layout == "pairs":
            fields += [("out", "i1")]  # the pair's outcome index (on its chosen side; _NO_PAIR elsewhere)
        if not has_true:
            fields += [("ok", "?")]
        elif layout == "pairs":
            fields += [("x", "f8"), ("y", "f8"), ("text", "u8"), ("order", "i8")]
        else:
            fields += [("x", "f8"), ("y", "f8"), ("order", "i8")]
        self.prompt_buckets = self.stack.enter_context(Buckets(fields, n_buckets, temp_dir))
        weights = (40, 60) if not has_true or n_buckets == 1 else (35, 35, 15, 15)
        self.progress = _Progress(on_progress, weights)

    def __enter__(self) -> _ReportBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # -- pass 1: the input rows

    def add_rows(self, batch: pl.DataFrame) -> None:
        """Count one batch of projected rows and send its responses to the prompt buckets."""
        self.rows_read += batch.height
        # One rule for the rewards: a row with a null, NaN or infinite value is skipped and counted.
        clean = batch.drop_nulls()
        floats = [name for name, dtype in clean.schema.items() if dtype.is_float()]
        if floats:
            clean = clean.filter(_finite(*floats))
        self.dropped += batch.height - clean.height
        n = clean.height
        if n:
            codes = [coder.encode(clean) for coder in self.coders]
            for j in self.columns:
                self.rows[j] = _grow(self.rows[j], np.bincount(codes[j]))
            prompt = clean[_P].to_numpy()
            bucket = (prompt % np.uint64(self.n_buckets)).astype(np.int64) if self.n_buckets > 1 else 0
            if self.layout == "pairs":
                self._add_pairs(clean, prompt, bucket, codes)
            else:
                self._add_long(clean, prompt, bucket, codes)
            self.clean_rows += n
        self.progress.at(0, self.rows_read / max(self.rows_expected, 1))

    def _add_pairs(self, clean: pl.DataFrame, prompt: np.ndarray, bucket: Any, codes: list[np.ndarray]) -> None:
        true_margin = pl.col("_tc") - pl.col("_tr") if self.has_true else pl.lit(1.0)
        outcome = clean.select(pair_outcome(pl.col("_pc") - pl.col("_pr"), true_margin)).to_series()
        index = _outcome_index(outcome)
        for j in self.columns:
            self.cells[j] = _grow(self.cells[j], np.bincount(codes[j] * 4 + index))
        if self.worst:
            self._add_worst_pairs(clean, true_margin)
        split_codes = {f"c{j}": codes[j] for j in self.columns if j}
        if not self.has_true:
            self.prompt_buckets.add({"prompt": prompt, "ok": index == 0, "out": index, **split_codes}, bucket)
            return
        x = np.concatenate([clean["_tc"].to_numpy(), clean["_tr"].to_numpy()])
        y = np.concatenate([clean["_pc"].to_numpy(), clean["_pr"].to_numpy()])
        row = np.arange(self.clean_rows, self.clean_rows + clean.height, dtype=np.int64)
        columns = {
            "prompt": np.concatenate([prompt, prompt]),
            "x": x,
            "y": y,
            "text": np.concatenate([clean["_hc"].to_numpy(), clean["_hr"].to_numpy()]),
            "order": np.concatenate([row, row | (1 << 40)]),  # every chosen side, then every rejected side
            "out": np.concatenate([index, np.full(len(index), _NO_PAIR)]),
            **{name: np.concatenate([code, code]) for name, code in split_codes.items()},
        }
        self.prompt_buckets.add(columns, np.concatenate([bucket, bucket]) if self.n_buckets > 1 else 0)
        self._sample(x, y)

    def _add_long(self, clean: pl.DataFrame, prompt: np.ndarray, bucket: Any, codes: list[np.ndarray]) -> None:
        x, y = clean[_X].to_numpy(), clean[_Y].to_numpy()
        columns = {"prompt": prompt, "x": x, "y": y, "order": clean["_row"].to_numpy()}
        self.prompt_buckets.add(columns | {f"c{j}": codes[j] for j in self.columns if j}, bucket)
        self._sample(x, y)

    def _sample(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.n_buckets > 1:
            step = max(1, self.responses_expected // _SAMPLE)
            self.samples["x"].append(x[::step].copy())  # a copy: a view would keep the whole batch alive
            self.samples["y"].append(y[::step].copy())

    def _add_worst_pairs(self, clean: pl.DataFrame, true_margin: pl.Expr) -> None:
        frame = clean.select(
            pl.col("_id").alias(C.PAIR_ID),
            (pl.col("_pc") - pl.col("_pr")).alias("pred_margin"),
            true_margin.alias("true_margin"),
        )
        self.worst_frames.append(_worst(frame, self.worst))

    # -- passes 2 to 4 and the report

    def report(self, *, pred: str, true: str | None, n_boot: int, seed: int) -> RankReport:
        """Finish the passes over the buckets and assemble the report."""
        if self.clean_rows == 0:
            raise PrefnoiseError("no rows with both a predicted and a reference reward to compare")
        sizes = [len(coder.labels) for coder in self.coders]
        per_prompt = _PromptTotals(sizes)
        global_stats: list[dict[str, np.ndarray]] | None = None
        if not self.has_true:
            self._prompt_pass_labels(per_prompt, sizes)
        else:
            global_stats = self._prompt_pass(per_prompt, sizes)
        overall = None
        splits: dict[str, dict[str, RankMetrics]] = {}
        for j, coder in zip(self.columns, self.coders, strict=True):
            order = coder.sorted_codes()
            # Both layouts resample prompts (clusters): pairs of one prompt share its responses and
            # are not independent, so a bootstrap over pairs would be far too narrow.
            agreements = per_prompt.agreements(j, order, n_boot, seed, pairs=self.layout == "pairs")
            metrics = _metrics_per_split(
                _grow(np.zeros(sizes[j], dtype=np.int64), self.rows[j])[order],
                agreements,
                per_prompt.preservations(j, order),
                None if global_stats is None else per_prompt.means(j, order),
                None if global_stats is None else {name: v[order] for name, v in global_stats[j].items()},
            )
            if j == 0:
                overall = metrics[0]
            else:
                splits[str(coder.name)] = {str(coder.labels[code]): m for code, m in zip(order, metrics, strict=True)}
        assert overall is not None
        worst = pl.concat(self.worst_frames) if self.worst_frames else None
        clusters = per_prompt.clusters(0, self.layout == "pairs")
        return RankReport(
            interval=f"cluster bootstrap over {clusters} prompts" if n_boot > 0 else "none (n_boot = 0)",
            layout=self.layout,
            reference="score" if self.has_true else "labels",
            pred=pred,
            true=true,
            overall=overall,
            splits=splits,
            worst=[] if worst is None else _worst(worst, self.worst).to_dicts(),
            dropped_rows=self.dropped,
            n_boot=n_boot,
            seed=seed,
        )

    def _prompt_pass_labels(self, totals: _PromptTotals, sizes: list[int]) -> None:
        """Labels as the reference: a prompt is preserved when all of its pairs are ranked right."""
        for i in range(self.n_buckets):
            rec = self.prompt_buckets.read(i)
            if len(rec["prompt"]):
                prompt = _dense(rec["prompt"])
                for j in self.columns:
                    key = prompt * sizes[j] + (rec[f"c{j}"] if j else 0)
                    groups, group = np.unique(key, return_inverse=True)
                    wrong = np.bincount(group.reshape(-1), weights=(~rec["ok"]).astype(float), minlength=len(groups))
                    totals.add_flags(j, groups % sizes[j], wrong == 0, np.ones(len(groups), dtype=bool))
                    totals.add_pair_outcomes(j, key, rec["out"], sizes[j])
            self.progress.at(1, (i + 1) / self.n_buckets)

    def _prompt_pass(self, totals: _PromptTotals, sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """Per-prompt statistics bucket by bucket; returns the statistics over all responses."""
        one_bucket = self.n_buckets == 1
        x_bounds = y_bounds = np.zeros(0)
        if not one_bucket:
            x_bounds = cut_points(np.concatenate(self.samples["x"]), self.n_buckets)
            y_bounds = cut_points(np.concatenate(self.samples["y"]), self.n_buckets)
        fields = [("x", "f8"), ("y", "f8")] + [(f"c{j}", "i4") for j in self.columns if j]
        fields += [(f"k{j}", "?") for j in self.columns]
        x_buckets = self.stack.enter_context(Buckets(fields, 2 * len(x_bounds) + 1, self.temp_dir))
        result: list[dict[str, np.ndarray]] = []
        for i in range(self.n_buckets):
            rec = self.prompt_buckets.read(i)
            if len(rec["prompt"]):
                codes, keeps, ranked = self._prompt_bucket(rec, totals, sizes)
                if one_bucket:
                    for j in self.columns:
                        stats = grouped_stats(ranked, codes[j], keeps[j])
                        result.append({n: _spread(v, stats["code"], sizes[j]) for n, v in stats.items() if n != "code"})
                else:
                    columns = {"x": rec["x"], "y": rec["y"]}
                    columns |= {f"c{j}": codes[j] for j in self.columns if j}
                    columns |= {
                        f"k{j}": np.ones(len(rec["x"]), bool) if keeps[j] is None else keeps[j] for j in self.columns
                    }
                    x_buckets.add(columns, value_bucket(x_bounds, rec["x"]))
            self.progress.at(1, (i + 1) / self.n_buckets)
        self.prompt_buckets.close()
        if one_bucket:
            return result or [_empty_stats(size) for size in sizes]
        return GlobalRanks(
            sizes,
            x_bounds,
            y_bounds,
            chunk=self.memory_responses,
            temp_dir=self.temp_dir,
            stack=self.stack,
            progress=lambda stage, fraction: self.progress.at(2 + stage, fraction),
        ).run(x_buckets)

    def _prompt_bucket(
        self, rec: dict[str, np.ndarray], totals: _PromptTotals, sizes: list[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray | None], Orders]:
        """Per-prompt statistics of one bucket; returns each column's codes and kept rows, and the
        bucket's sort orders."""
        prompt = _dense(rec["prompt"])
        first = _first_rows(prompt, rec["text"]) if "text" in rec else None
        if first is not None:  # "first" means first in the table: put the rows back in table order
            order = np.argsort(rec["order"], kind="stable")
            for name in rec:
                rec[name] = rec[name][order]
            prompt = prompt[order]
            first = _first_rows(prompt, rec["text"])
        codes = [rec[f"c{j}"].astype(np.int64) if j else np.zeros(len(prompt), dtype=np.int64) for j in self.columns]
        keeps: list[np.ndarray | None] = []
        ranked = orders(rec["x"], rec["y"])
        for j in self.columns:
            group = prompt * sizes[j] + codes[j]
            keep = first if j == 0 or first is None else _first_rows(group, rec["text"])
            keeps.append(keep)
            stats = grouped_stats(ranked, group, keep)
            stats["split"] = stats["code"] % sizes[j]
            totals.add_prompts(j, stats, sizes[j])
            if "out" in rec:
                totals.add_pair_outcomes(j, group, rec["out"], sizes[j])
        if self.worst and self.layout == "long":
            self.worst_frames.append(_worst(_long_pairs(rec), self.worst))
        return codes, keeps, ranked


@dataclass
class _PromptTotals:
    """Per-prompt results summed over buckets, per split column and code."""

    sizes: list[int]

    def __post_init__(self) -> None:
        zeros = [np.zeros(size) for size in self.sizes]
        self.prompts, self.preserved, self.unordered = ([z.copy() for z in zeros] for _ in range(3))
        self.tau_sum, self.tau_count, self.rho_sum, self.rho_count, self.n_prompts, self.true_ties = (
            [z.copy() for z in zeros] for _ in range(6)
        )
        self.cells: list[list[pl.DataFrame]] = [[] for _ in self.sizes]
        self.pair_cells: list[list[pl.DataFrame]] = [[] for _ in self.sizes]  # pair tables' outcomes per prompt

    def add_pair_outcomes(self, j: int, group: np.ndarray, out: np.ndarray, size: int) -> None:
        """A pair table's outcomes summed per (prompt, split) ``group`` code: one cluster each."""
        mine = out != _NO_PAIR
        if not mine.any():
            return
        groups, index = np.unique(group[mine], return_inverse=True)
        counts = np.zeros((len(groups), 4))
        np.add.at(counts, (index.reshape(-1), out[mine].astype(np.int64)), 1.0)
        cells = pl.DataFrame(
            {
                _G: groups % size,
                "num": counts @ _OUTCOMES,
                "den": counts @ _OUTCOME_DEN,
                "pties": counts[:, 1],
                "tties": counts[:, 3],
            }
        )
        self.pair_cells[j].append(
            cells.group_by(_G, "num", "den").agg(pl.len().alias("count"), pl.col("pties").sum(), pl.col("tties").sum())
        )

    def clusters(self, j: int, pairs: bool) -> int:
        """How many prompt clusters the agreement of column ``j`` resamples (all splits together)."""
        parts = (self.pair_cells if pairs else self.cells)[j]
        return int(sum(int(part["count"].sum()) for part in parts))

    def add_flags(self, j: int, split: np.ndarray, ok: np.ndarray, ordered: np.ndarray) -> None:
        size = self.sizes[j]
        self.prompts[j] += np.bincount(split[ordered], minlength=size)
        self.preserved[j] += np.bincount(split[ordered & ok], minlength=size)
        self.unordered[j] += np.bincount(split[~ordered], minlength=size)

    def add_prompts(self, j: int, stats: dict[str, np.ndarray], size: int) -> None:
        split = stats["split"]
        strict = stats["n0"] - stats["n1"]  # pairs with a strict true order
        pred_only_ties = stats["n2"] - stats["n3"]
        concordant = strict - pred_only_ties - stats["dis"]
        self.add_flags(j, split, concordant == strict, strict > 0)
        for values, total, count in (
            (tau_b(stats), self.tau_sum, self.tau_count),
            (stats["rho"], self.rho_sum, self.rho_count),
        ):
            ok = np.isfinite(values)
            total[j] += np.bincount(split[ok], weights=values[ok], minlength=size)
            count[j] += np.bincount(split[ok], minlength=size)
        self.n_prompts[j] += np.bincount(split, minlength=size)
        self.true_ties[j] += np.bincount(split, weights=stats["n1"], minlength=size)
        cells = pl.DataFrame(
            {
                _G: split,
                "num": concordant + 0.5 * pred_only_ties,
                "den": strict.astype(float),
                "pties": pred_only_ties.astype(float),
            }
        )
        self.cells[j].append(cells.group_by(_G, "num", "den").agg(pl.len().alias("count"), pl.col("pties").sum()))

    def agreements(self, j: int, order: np.ndarray, n_boot: int, seed: int, pairs: bool = False) -> list[Agreement]:
        """The agreement per code (in ``order``): over all within-prompt pairs of a long table, or
        over a pair table's pairs (``pairs``); the interval resamples prompts either way."""
        position = np.argsort(order)  # code -> its place in the sorted order
        parts = self.pair_cells[j] if pairs else self.cells[j]
        if not parts:
            return _agreements(_pair_cells(np.zeros(0, dtype=np.int64), len(order), order), n_boot, seed, len(order))
        extra = [pl.col("tties").sum()] if pairs else []
        cells = (
            pl.concat(parts)
            .group_by(_G, "num", "den")
            .agg(pl.col("count").sum(), pl.col("pties").sum(), *extra)
            .with_columns(pl.col(_G).replace_strict(list(range(len(order))), position.tolist()))
        )
        if pairs:
            true_ties = np.zeros(len(order))
            for split, ties in cells.group_by(_G).agg(pl.col("tties").sum()).iter_rows():
                true_ties[split] = ties
            cells = cells.drop("tties")
        else:
            true_ties = self.true_ties[j][order]
        return _agreements(cells, n_boot, seed, len(order), true_ties=true_ties)

    def preservations(self, j: int, order: np.ndarray) -> list[Preservation]:
        return [
            Preservation(float(kept / total) if total else None, int(total), int(kept), int(none))
            for total, kept, none in zip(
                self.prompts[j][order], self.preserved[j][order], self.unordered[j][order], strict=True
            )
        ]

    def means(self, j: int, order: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "tau": (self.tau_sum[j] / self.tau_count[j])[order],
                "rho": (self.rho_sum[j] / self.rho_count[j])[order],
                "with_tau": self.tau_count[j][order],
                "prompts": self.n_prompts[j][order],
            }


def _spread(values: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """``values`` (one per present code) spread over all ``size`` codes, zero elsewhere."""
    out = np.zeros(size)
    out[codes] = values
    return out


def _empty_stats(size: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(size) for name in ("n", "n0", "n1", "n2", "n3", "dis", "rho")}


def _metrics_per_split(
    rows: np.ndarray,
    agreements: list[Agreement],
    preservations: list[Preservation],
    means: dict[str, np.ndarray] | None,
    overall: dict[str, np.ndarray] | None,
) -> list[RankMetrics]:
    """RankMetrics per code (already in sorted order); without a true reward only the pair metrics."""
    if overall is None or means is None:
        return [
            RankMetrics(rows=int(r), agreement=a, preservation=p)
            for r, a, p in zip(rows, agreements, preservations, strict=True)
        ]
    taus = tau_b(overall)
    no_responses = overall["n"] == 0
    rho = np.where(no_responses, np.nan, overall["rho"])
    return [
        RankMetrics(
            rows=int(rows[i]),
            agreement=agreements[i],
            preservation=preservations[i],
            responses=int(overall["n"][i]),
            prompts=int(means["prompts"][i]),
            kendall_tau_b=_float(taus[i]),
            spearman_rho=_float(rho[i]),
            kendall_tau_b_per_prompt=_float(means["tau"][i]),
            spearman_rho_per_prompt=_float(means["rho"][i]),
            prompts_with_tau=int(means["with_tau"][i]),
        )
        for i in range(len(rows))
    ]


def _first_rows(group: np.ndarray, text: np.ndarray) -> np.ndarray | None:
    """Mask of the rows whose (group, text hash) no earlier row has; None when every row is new
    (checked first with one value sort, much cheaper than the hash-based dedupe)."""
    shift = int(group.max()).bit_length()
    if shift > 32:
        keys = pl.DataFrame({"group": group, "text": text}).select(pl.struct("group", "text")).to_series()
    else:  # the group in the high bits, the text hash's top (64 - shift) bits below it
        high = group.astype(np.uint64) << np.uint64(64 - shift) if shift else np.uint64(0)
        keys = pl.Series(high | (text >> np.uint64(shift)))
    if keys.dtype != pl.Struct:
        ordered = keys.sort().to_numpy()
        if not (ordered[1:] == ordered[:-1]).any():
            return None
    first = keys.is_first_distinct().to_numpy()
    return None if first.all() else first


def _float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------- worst pairs


def _worst(frame: pl.DataFrame, k: int) -> pl.DataFrame:
    """The ``k`` rows of (id, pred_margin, true_margin[, signed_margin]) ranked most confidently
    wrong: most negative signed margin first, truth ties left out, ids breaking ties."""
    if "signed_margin" not in frame.columns:
        frame = frame.filter(pl.col("true_margin") != 0).with_columns(
            signed_margin(pl.col("pred_margin"), pl.col("true_margin")).alias("signed_margin")
        )
    return frame.sort("signed_margin", frame.columns[0]).head(k)


def _long_pairs(rec: dict[str, np.ndarray]) -> pl.DataFrame:
    """Every (better, worse) pair of responses under one prompt of a long-table bucket, named
    by their input rows."""
    rows = pl.DataFrame({_P: rec["prompt"], _X: rec["x"], _Y: rec["y"], "_row": rec["order"]}).lazy()
    return (
        rows.join(rows, on=_P, suffix="_b")
        .filter(pl.col(_X) > pl.col(f"{_X}_b"))
        .select(
            pl.format("{}>{}", "_row", "_row_b").alias("rows"),
            (pl.col(_Y) - pl.col(f"{_Y}_b")).alias("pred_margin"),
            (pl.col(_X) - pl.col(f"{_X}_b")).alias("true_margin"),
        )
        .collect()
    )


def _outcome_index(outcome: pl.Series) -> np.ndarray:
    """Each pair outcome as an index into ``_OUTCOMES``: right, predicted tie, wrong, true tie."""
    return outcome.replace_strict({1.0: 0, 0.5: 1, 0.0: 2}, default=3, return_dtype=pl.Int64).to_numpy()


def _pair_cells(counts: np.ndarray, size: int, order: np.ndarray) -> pl.DataFrame:
    """(split, num, den, count) cells from per-code outcome counts, splits numbered in ``order``."""
    table = _grow(np.zeros(size * 4, dtype=np.int64), counts).reshape(size, 4)[order]
    return pl.DataFrame(
        {
            _G: np.repeat(np.arange(size), 4),
            "num": np.tile(_OUTCOMES, size),
            "den": np.tile(_OUTCOME_DEN, size),
            "count": table.reshape(-1),
        }
    ).filter(pl.col("count") > 0)


# --------------------------------------------------------------------------- agreement


def _agreements(
    cells: pl.DataFrame, n_boot: int, seed: int, n_splits: int, true_ties: np.ndarray | None = None
) -> list[Agreement]:
    """Agreement, bootstrap interval and tie counts per split from (split, num, den, count) cells:
    every unit with the same (num, den) is interchangeable, so a bootstrap resample is exactly a
    multinomial draw over the cells — O(n_boot x cells), not O(n_boot x rows)."""
    result = []
    for split in range(n_splits):
        # Cells in a fixed order: group_by's order varies, and the resamples depend on it.
        part = cells.filter(pl.col(_G) == split).sort("num", "den")
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


# --------------------------------------------------------------------------- figure data


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
        head = lazy.with_columns(pl.col(rewards).cast(pl.Float64)).filter(_finite(*rewards)).head(max_rows)
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
        rows = lazy.with_row_index("_row").select(_long_columns(pred, true, [])).filter(_finite(_X, _Y)).head(max_rows)
        points = rows.select(pl.col(_X).alias("true"), pl.col(_Y).alias("pred"))
        pairs = (
            rows.join(rows, on=_P, suffix="_b")
            .filter(pl.col(_X) > pl.col(f"{_X}_b"))
            .select(
                (pl.col(_X) - pl.col(f"{_X}_b")).alias("true_margin"),
                pair_outcome(pl.col(_Y) - pl.col(f"{_Y}_b"), pl.col(_X) - pl.col(f"{_X}_b")).alias("outcome"),
            )
        )
    return points.drop_nulls().collect(), pairs.drop_nulls().head(max_rows).collect()
