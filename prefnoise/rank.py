"""Rank metrics: does a learned reward order responses like the true reward does?

The paper (Nishimori et al. 2025, Sec. 4.1) calls a reward r *rank-preserving* with respect to the
true reward r* when, for every prompt and every two responses a, a', r*(a) > r*(a') implies
r(a) > r(a'). This module measures how close a reward comes to that, on two input shapes:

* the canonical **pair table** (one row per pair; predicted ``chosen_<pred>``/``rejected_<pred>``,
  reference ``chosen_<true>``/``rejected_<true>``, or the labels themselves when no true reward
  exists: the chosen response is then taken as the better one);
* a **long table** of responses: ``prompt_id``, ``<pred>``, ``<true>`` (k responses per prompt,
  UltraFeedback style); its pairs are all pairs of responses under one prompt.

Pair-level quantities are polars expressions; the rank statistics (Kendall's tau-b, Spearman's rho)
run on sorted numpy arrays in O(n log n) (Knight's algorithm), nothing quadratic and no Python loop
over rows. The responses are argsorted twice per report, by (true, pred) and by pred, with polars'
multi-threaded sort; every grouping after that (whole table, each split, each prompt) only sorts
packed int64 (group, position) values. Discordant pairs: scipy's compiled Fenwick tree for a few
large groups (numpy bit passes without scipy), neighbour comparisons for many small groups.

For a pair table, "all responses" means the pairs reshaped to one row per response, keeping the
first row of each (split, prompt, response text) — a response that appears in several pairs of a
prompt is counted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError

PROMPT_ID = "prompt_id"  # the long table's prompt key
LONG_REQUIRED = (PROMPT_ID,)
CONFIDENCE = 0.95
# Bootstrap replicates are drawn this many category-counts at a time, so memory stays flat.
_BOOT_CELLS = 2_000_000
# Above this many groups the grouped discordant-pair count walks segments instead of the
# whole array (cheaper when each group is small, e.g. one group per prompt).
_FEW_GROUPS = 64
# Groups of at most this many responses (e.g. 4 per prompt) compare neighbours instead of sorting by y.
_SMALL_GROUP = 8

# scipy's compiled Fenwick-tree count (private, hence optional): 3-4x faster than numpy passes.
# Looked up on first use (False = not yet), so importing rank (and the CLI) does not load scipy.
_scipy_discordant: Any = False


def _compiled_discordant() -> Any:
    global _scipy_discordant
    if _scipy_discordant is False:
        try:
            from scipy.stats._stats import _kendall_dis as found
        except ImportError:  # pragma: no cover
            found = None
        _scipy_discordant = found
    return _scipy_discordant

# Internal column names of the responses and outcome frames.
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
    dropped_rows: int = 0  # rows with a missing or NaN reward
    n_boot: int = 0
    seed: int = C.DEFAULT_SEED

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return asdict(self)


# --------------------------------------------------------------------------- expressions


def pair_outcome(pred_margin: pl.Expr, true_margin: pl.Expr) -> pl.Expr:
    """Expression: 1 when the prediction orders a pair like the truth, 0.5 on a predicted tie,
    0 when reversed, null when the truth ties (the pair says nothing about ranking)."""
    agree = pl.when(pred_margin == 0).then(0.5).when((pred_margin > 0) == (true_margin > 0)).then(1.0)
    return pl.when(true_margin == 0).then(None).otherwise(agree.otherwise(0.0))


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
    ``true`` is None), with a seeded bootstrap 95% interval over pairs."""
    outcomes = _pair_outcomes(frame.lazy(), pred, true, ()).collect()
    return _agreement_from_outcomes(outcomes, n_boot, seed)[0]


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between two equal-length arrays (NaN when either is constant); O(n log n)."""
    stats = _rank_stats((np.zeros(len(x), dtype=np.int64),), np.asarray(x, float), np.asarray(y, float))
    return float(_tau_b(stats)[0])


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either array is constant."""
    stats = _rank_stats((np.zeros(len(x), dtype=np.int64),), np.asarray(x, float), np.asarray(y, float))
    return float(stats["rho"][0])


def rank_preservation(frame: Frame, *, pred: str = C.REWARD, true: str = C.SCORE) -> Preservation:
    """Fraction of prompts of a long table (``prompt_id``, ``pred``, ``true``) whose predicted
    reward keeps every strict true order between two of its responses (paper Sec. 4.1)."""
    responses = _long_responses(frame.lazy(), pred, true, ()).collect()
    per_prompt = _per_prompt_stats(responses)
    return _preservation(per_prompt)[0]


def rank_report(
    data: Frame,
    *,
    pred: str = C.REWARD,
    true: str = C.SCORE,
    group_by: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = C.DEFAULT_SEED,
    worst: int = 0,
    layout: str = "auto",
    on_progress: Callable[[int], None] | None = None,
) -> RankReport:
    """Every rank metric of ``data`` (pair or long table), overall and split by ``flipped`` (when
    present) and by each ``group_by`` column, plus the ``worst`` most wrongly ranked pairs.

    Reads only the columns it needs from a LazyFrame. Progress advances once per split.
    """
    lazy = data.lazy()
    names = lazy.collect_schema().names()
    layout = detect_layout(names, pred, layout)
    splits = list(dict.fromkeys([*([C.FLIPPED] if C.FLIPPED in names else []), *group_by]))
    missing = [name for name in splits if name not in names]
    if missing:
        raise PrefnoiseError(f"--group-by column {missing[0]!r} not in the data; columns are {', '.join(names)}")
    if layout == "pairs":
        has_true = C.chosen(true) in names and C.rejected(true) in names
        reference_true = true if has_true else None
        lazy = _pair_frame(lazy, names, pred, reference_true, splits, pair_ids=worst > 0)
    else:
        if true not in names:
            raise PrefnoiseError(
                f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}. "
                "Use --true to name it"
            )
        reference_true = true
        lazy = lazy.select(_long_columns(names, pred, true, splits))
    base = lazy.collect()  # only the projected columns
    clean = base.drop_nulls().filter(~pl.any_horizontal(pl.selectors.float().is_nan()))
    dropped = base.height - clean.height
    del base
    if clean.height == 0:
        raise PrefnoiseError("no rows with both a predicted and a reference reward to compare")
    # Sorted once, reused by every split: the expensive part of the rank statistics.
    responses = _responses(clean, layout) if reference_true else None

    def metrics_by(split: str | None) -> dict[Any, RankMetrics]:
        result = _metrics(clean, layout, responses, split, n_boot, seed)
        if on_progress is not None:
            on_progress(1)
        return result

    report = RankReport(
        layout=layout,
        reference="score" if reference_true else "labels",
        pred=pred,
        true=reference_true,
        overall=metrics_by(None)[None],
        dropped_rows=dropped,
        n_boot=n_boot,
        seed=seed,
    )
    for split in splits:
        report.splits[split] = {str(key): value for key, value in metrics_by(split).items()}
    if worst > 0:
        report.worst = _worst_pairs(clean, layout, worst)
    return report


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
        pair_id = pl.col(C.PAIR_ID) if C.PAIR_ID in names else pl.int_range(pl.len())
        cols.append(pair_id.cast(pl.String).alias("_id"))
    if true:
        cols += [
            pl.col(C.chosen(true)).cast(pl.Float64).alias("_tc"),
            pl.col(C.rejected(true)).cast(pl.Float64).alias("_tr"),
            pl.col(C.CHOSEN).hash(seed=2).alias("_hc"),
            pl.col(C.REJECTED).hash(seed=2).alias("_hr"),
        ]
    cols += [_split_column(name) for name in splits]
    return lazy.select(cols)


def _long_columns(names: list[str], pred: str, true: str, splits: list[str]) -> list[pl.Expr]:
    return [
        pl.col(PROMPT_ID).hash(seed=1).alias(_P),
        pl.col(pred).cast(pl.Float64).alias(_Y),
        pl.col(true).cast(pl.Float64).alias(_X),
        pl.int_range(pl.len()).alias("_row"),
        *[_split_column(name) for name in splits],
    ]


def _split_column(name: str) -> pl.Expr:
    """A split column as text, nulls spelled "null", so every row belongs to a split."""
    return pl.col(name).cast(pl.String).fill_null("null")


def _split_codes(frame: pl.DataFrame, split: str | None) -> tuple[pl.DataFrame, list[Any]]:
    """``frame`` with a dense split code column, and the split values in code order."""
    if split is None:
        return frame.with_columns(pl.lit(0, dtype=pl.Int64).alias(_G)), [None]
    labels = frame[split].unique().sort().to_list()
    code = pl.col(split).replace_strict(labels, list(range(len(labels))), return_dtype=pl.Int64)
    return frame.with_columns(code.alias(_G)), labels


def _pair_outcomes(lazy: pl.LazyFrame, pred: str, true: str | None, splits: Sequence[str]) -> pl.LazyFrame:
    """Per-pair outcome frame from a raw pair table (for the public single-metric function)."""
    names = lazy.collect_schema().names()
    detect_layout(names, pred, "pairs")
    has = true is not None and C.chosen(true) in names
    frame = lazy.select(
        (pl.col(C.chosen(pred)) - pl.col(C.rejected(pred))).cast(pl.Float64).alias("_pm"),
        (pl.col(C.chosen(true)) - pl.col(C.rejected(true))).cast(pl.Float64).alias("_tm")
        if has
        else pl.lit(1.0).alias("_tm"),
    ).drop_nulls()
    return frame.select(pair_outcome(pl.col("_pm"), pl.col("_tm")).alias("_num"), pl.lit(0, pl.Int64).alias(_G))


def _long_responses(lazy: pl.LazyFrame, pred: str, true: str, splits: Sequence[str]) -> pl.LazyFrame:
    names = lazy.collect_schema().names()
    detect_layout(names, pred, "long")
    if true not in names:
        raise PrefnoiseError(f"long table: true-reward column {true!r} missing; columns are {', '.join(names)}")
    frame = lazy.select(_long_columns(names, pred, true, [])).drop_nulls()
    return frame.with_columns(pl.lit(0, dtype=pl.Int64).alias(_G))


# --------------------------------------------------------------------------- metrics per split


def _metrics(
    clean: pl.DataFrame, layout: str, responses: _Responses | None, split: str | None, n_boot: int, seed: int
) -> dict[Any, RankMetrics]:
    """RankMetrics for each value of ``split`` (or one entry keyed None for the whole table);
    ``responses`` is None when the labels are the reference."""
    keyed, labels = _split_codes(clean, split)
    n_splits = len(labels)
    split_code = keyed[_G].to_numpy()
    rows = np.bincount(split_code, minlength=n_splits)
    if layout == "pairs":
        true_margin = pl.col("_tc") - pl.col("_tr") if responses is not None else pl.lit(1.0)
        outcomes = keyed.select(_G, _P, pair_outcome(pl.col("_pc") - pl.col("_pr"), true_margin).alias("_num"))
        agreements = _agreement_from_outcomes(outcomes, n_boot, seed, n_splits)
    if responses is None:
        # Labels as the reference: a prompt is preserved when all of its pairs are ranked right.
        prompts = outcomes.group_by(_G, _P).agg((pl.col("_num") == 1).all().alias("_ok"))
        preservations = _preservation_from_flags(prompts, n_splits)
        return {
            label: RankMetrics(rows=int(rows[i]), agreement=agreements[i], preservation=preservations[i])
            for i, label in enumerate(labels)
        }
    code = np.concatenate([split_code, split_code]) if layout == "pairs" else split_code
    keep = responses.first
    if split is not None and keep is not None:  # a response recurs within a prompt: keep its first row per split
        keep = _first_rows(responses.prompt * n_splits + code, responses.text)
    per_prompt = _grouped_stats(responses.orders, responses.prompt * n_splits + code, keep)
    per_prompt["split"] = per_prompt["code"] % n_splits
    if layout == "long":
        agreements = _agreement_from_prompts(per_prompt, n_boot, seed, n_splits)
    preservations = _preservation(per_prompt, n_splits)
    overall = _grouped_stats(responses.orders, code, keep)
    overall = {
        name: _by_code(overall[name], overall["code"], n_splits, np.nan if name == "rho" else 0.0)
        for name in ("n", "n0", "n1", "n2", "n3", "dis", "rho")
    }
    taus = _tau_b(overall)
    per_tau = _tau_b(per_prompt)
    tau_mean = _group_means(per_prompt["split"], per_tau, n_splits)
    rho_mean = _group_means(per_prompt["split"], per_prompt["rho"], n_splits)
    n_prompts = np.bincount(per_prompt["split"], minlength=n_splits)
    return {
        label: RankMetrics(
            rows=int(rows[i]),
            agreement=agreements[i],
            preservation=preservations[i],
            responses=int(overall["n"][i]),
            prompts=int(n_prompts[i]),
            kendall_tau_b=_float(taus[i]),
            spearman_rho=_float(overall["rho"][i]),
            kendall_tau_b_per_prompt=_float(tau_mean[0][i]),
            spearman_rho_per_prompt=_float(rho_mean[0][i]),
            prompts_with_tau=int(tau_mean[1][i]),
        )
        for i, label in enumerate(labels)
    }


def _by_code(values: np.ndarray, codes: np.ndarray, n: int, missing: float) -> np.ndarray:
    """``values`` (one per present code) spread over all ``n`` codes, ``missing`` elsewhere."""
    out = np.full(n, missing)
    out[codes] = values
    return out


@dataclass
class _Responses:
    """The responses every split ranks, prepared once per report: both sort orders, dense prompt
    codes and, for a pair table, which rows first show each (prompt, response text)."""

    orders: _Orders
    prompt: np.ndarray  # dense prompt code of each response
    text: np.ndarray | None  # hash of each response's text (pair tables with a recurring response)
    first: np.ndarray | None  # rows first to show their (prompt, text); None when all are


def _responses(clean: pl.DataFrame, layout: str) -> _Responses:
    """A pair table's chosen then rejected sides (or a long table's rows) as responses."""
    prompt = (clean[_P].rank("dense").to_numpy() - 1).astype(np.int64)
    if layout == "long":
        return _Responses(_orders(clean[_X].to_numpy(), clean[_Y].to_numpy()), prompt, None, None)
    x = np.concatenate([clean["_tc"].to_numpy(), clean["_tr"].to_numpy()])
    y = np.concatenate([clean["_pc"].to_numpy(), clean["_pr"].to_numpy()])
    prompt = np.concatenate([prompt, prompt])
    text = np.concatenate([clean["_hc"].to_numpy(), clean["_hr"].to_numpy()])
    first = _first_rows(prompt, text)
    return _Responses(_orders(x, y), prompt, text if first is not None else None, first)


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


def _group_means(split: np.ndarray, values: np.ndarray, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the finite ``values`` per split, and how many were finite."""
    ok = np.isfinite(values)
    counts = np.bincount(split[ok], minlength=n_splits)
    sums = np.bincount(split[ok], weights=values[ok], minlength=n_splits)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, counts


# --------------------------------------------------------------------------- agreement


def _agreement_from_outcomes(outcomes: pl.DataFrame, n_boot: int, seed: int, n_splits: int = 1) -> list[Agreement]:
    """Agreement per split from per-pair outcomes (1 / 0.5 / 0 / null); bootstrap over pairs."""
    cells = (
        outcomes.lazy()
        .group_by(_G, pl.col("_num"))
        .agg(pl.len().alias("count"))
        .with_columns(
            pl.col("_num").fill_null(0.0).alias("num"),
            pl.col("_num").is_not_null().cast(pl.Float64).alias("den"),
        )
        .collect()
    )
    return _agreements(cells, n_boot, seed, n_splits)


def _agreement_from_prompts(
    per_prompt: dict[str, np.ndarray], n_boot: int, seed: int, n_splits: int
) -> list[Agreement]:
    """Agreement per split over all within-prompt response pairs; bootstrap over prompts."""
    strict = per_prompt["n0"] - per_prompt["n1"]  # pairs with a strict true order
    pred_only_ties = per_prompt["n2"] - per_prompt["n3"]
    concordant = strict - pred_only_ties - per_prompt["dis"]
    frame = pl.DataFrame(
        {
            _G: per_prompt["split"],
            "num": concordant + 0.5 * pred_only_ties,
            "den": strict.astype(float),
            "pties": pred_only_ties.astype(float),
        }
    )
    cells = frame.group_by(_G, "num", "den").agg(pl.len().alias("count"), pl.col("pties").sum())
    return _agreements(cells, n_boot, seed, n_splits, true_ties=_true_tie_pairs(per_prompt, n_splits))


def _true_tie_pairs(per_prompt: dict[str, np.ndarray], n_splits: int) -> np.ndarray:
    return np.bincount(per_prompt["split"], weights=per_prompt["n1"], minlength=n_splits)


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


# --------------------------------------------------------------------------- preservation


def _preservation(per_prompt: dict[str, np.ndarray], n_splits: int = 1) -> list[Preservation]:
    """A prompt keeps its ranking when every pair with a strict true order is concordant."""
    strict = per_prompt["n0"] - per_prompt["n1"]
    concordant = strict - (per_prompt["n2"] - per_prompt["n3"]) - per_prompt["dis"]
    flags = pl.DataFrame({_G: per_prompt["split"], "_ok": concordant == strict, "_ordered": strict > 0})
    return _preservation_from_flags(flags.filter("_ordered"), n_splits, unordered=flags.filter(~pl.col("_ordered")))


def _preservation_from_flags(
    prompts: pl.DataFrame, n_splits: int, unordered: pl.DataFrame | None = None
) -> list[Preservation]:
    split = prompts[_G].to_numpy()
    ok = prompts["_ok"].to_numpy()
    total = np.bincount(split, minlength=n_splits)
    kept = np.bincount(split, weights=ok.astype(float), minlength=n_splits)
    none = (
        np.bincount(unordered[_G].to_numpy(), minlength=n_splits) if unordered is not None else np.zeros(n_splits, int)
    )
    return [
        Preservation(float(kept[i] / total[i]) if total[i] else None, int(total[i]), int(kept[i]), int(none[i]))
        for i in range(n_splits)
    ]


# --------------------------------------------------------------------------- rank statistics


def _per_prompt_stats(responses: pl.DataFrame) -> dict[str, np.ndarray]:
    """Rank statistics per (split, prompt), with a "split" array naming each prompt's split."""
    keys = (responses[_G].to_numpy().astype(np.int64), responses[_P].to_numpy())
    return _rank_stats(keys, responses[_X].to_numpy(), responses[_Y].to_numpy())


def _rank_stats(keys: tuple[np.ndarray, ...], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per group (rows sharing all ``keys``; ``keys[0]`` is the split code), in key order:
    n, pair counts n0 (all), n1 (x ties), n2 (y ties), n3 (ties in both), dis (discordant
    pairs), Spearman's rho, and "split" (the group's keys[0])."""
    if len(x) == 0:
        empty = np.zeros(0)
        return {name: empty for name in ("n", "n0", "n1", "n2", "n3", "dis", "rho")} | {"split": empty.astype(int)}
    if len(keys) == 1:
        uniques, code = np.unique(keys[0], return_inverse=True)
        split = uniques
    else:
        uniques, code = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
        split = uniques[:, 0]
    stats = _grouped_stats(_orders(x, y), code.reshape(-1).astype(np.int64))
    stats["split"] = split.astype(np.int64)
    return stats


@dataclass
class _Orders:
    """Rows sorted by (x, y) and by y, computed once and shared by every grouping of the rows
    (whole table, each split, each prompt): a grouping then only needs an integer value sort."""

    by_xy: np.ndarray  # row at each position of the (x, y) order (Knight's order)
    by_y: np.ndarray  # row at each position of the y order
    pos_xy: np.ndarray  # each row's position in by_xy
    pos_y: np.ndarray
    x_dense: np.ndarray  # dense rank of x at each position of by_xy
    y_dense: np.ndarray  # dense rank of y at each position of by_y
    y_rank: np.ndarray  # dense rank of y of each row
    bits: int  # bits that hold a position


def _orders(x: np.ndarray, y: np.ndarray) -> _Orders:
    """Both orders of (x, y) with polars' multi-threaded sorts (two float argsorts in all
    unless x has ties, which cost one more integer argsort)."""
    m = len(x)
    index = np.int32 if m < 2**31 else np.int64
    by_y = _arg_sort(y)
    y_dense = np.cumsum(_starts(y[by_y]), dtype=index)
    y_dense -= 1
    y_rank = _inverse(by_y, y_dense)
    by_xy = _arg_sort(x)
    x_dense = np.cumsum(_starts(x[by_xy]), dtype=index)
    x_dense -= 1
    if m and x_dense[-1] + 1 < m:  # ties in x: order each tie by y
        x_rank = _inverse(by_xy, x_dense)
        y_bits = max(int(y_dense[-1]).bit_length(), 1)
        by_xy = _arg_sort((x_rank.astype(np.int64) << y_bits) | y_rank)
        x_dense = x_rank[by_xy]
    positions = np.arange(m, dtype=index)
    return _Orders(
        by_xy=by_xy,
        by_y=by_y,
        pos_xy=_inverse(by_xy, positions),
        pos_y=_inverse(by_y, positions),
        x_dense=x_dense,
        y_dense=y_dense,
        y_rank=y_rank,
        bits=max(int(m - 1).bit_length(), 1),
    )


def _arg_sort(values: np.ndarray) -> np.ndarray:
    return pl.Series(values).arg_sort().to_numpy()


def _inverse(order: np.ndarray, values: np.ndarray, size: int | None = None) -> np.ndarray:
    """``out[order[i]] = values[i]`` (``size`` rows, default ``len(order)``): a value per row
    from a value per sorted position."""
    out = np.empty(len(order) if size is None else size, dtype=values.dtype)
    out[order] = values
    return out


def _starts(values: np.ndarray) -> np.ndarray:
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return starts


def _grouped_order(
    code: np.ndarray, keep: np.ndarray | None, position: np.ndarray, order: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """(code, position) of the kept rows sorted by code, then position: one sort of packed
    int64 values (no argsort), or none for a single code."""
    if code.size and code.max() == code.min():
        positions = np.flatnonzero(keep[order]) if keep is not None else np.arange(len(order))
        return np.full(len(positions), code[0], dtype=np.int64), positions
    if keep is not None:
        code, position = code[keep], position[keep]
    packed = pl.Series((code.astype(np.int64, copy=False) << bits) | position).sort().to_numpy()
    return packed >> bits, packed & ((1 << bits) - 1)


def _grouped_stats(orders: _Orders, code: np.ndarray, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Rank statistics (n, n0, n1, n2, n3, dis, rho; see ``_rank_stats``) per group of rows
    sharing ``code`` (int64 >= 0), for the rows in ``keep`` (all when None); one entry per
    code present, in code order, with the codes in "code"."""
    bits = orders.bits
    uniques = None
    if int(code.max()).bit_length() + bits > 63:  # make the codes dense so (code, position) fits in 63 bits
        uniques, code = np.unique(code, return_inverse=True)
        code = code.reshape(-1).astype(np.int64)
    code_x, pos_x = _grouped_order(code, keep, orders.pos_xy, orders.by_xy, bits)
    first_x = _starts(code_x)
    codes = code_x[first_x] if uniques is None else uniques[code_x[first_x]]
    del code_x
    n_groups = len(codes)
    gx, start_x = np.cumsum(first_x) - 1, np.flatnonzero(first_x)
    rows_x = orders.by_xy[pos_x]
    rx = orders.x_dense[pos_x]
    ry = orders.y_rank[rows_x]
    del pos_x
    n = np.bincount(gx, minlength=n_groups).astype(float)
    x_run = first_x | _starts(rx)
    n1, x_avg = _ties_and_average_ranks(gx, x_run, start_x, n_groups)
    n3 = _ties_and_average_ranks(gx, x_run | _starts(ry), start_x, n_groups)[0] if n1.any() else np.zeros(n_groups)
    if n_groups > _FEW_GROUPS and n.max() <= _SMALL_GROUP:
        n2, y_avg, dis = _small_group_y_stats(gx, ry, n_groups, int(n.max()))
    else:
        code_y, pos_y = _grouped_order(code, keep, orders.pos_y, orders.by_y, bits)
        first_y = _starts(code_y)
        del code_y
        gy, start_y = np.cumsum(first_y) - 1, np.flatnonzero(first_y)
        y_run = first_y | _starts(orders.y_dense[pos_y])
        n2, y_avg_sorted = _ties_and_average_ranks(gy, y_run, start_y, n_groups)
        rows_y = orders.by_y[pos_y]
        y_avg = _inverse(rows_y, y_avg_sorted, len(orders.by_y))[rows_x]
        if n_groups <= _FEW_GROUPS:
            dis = _discordant_few(start_x, rx, ry)
        else:  # y ranks restart at 0 in each group, so the counting needs as few bits as the largest group
            y_dense = np.cumsum(y_run) - 1
            y_within = _inverse(rows_y, y_dense - y_dense[start_y][gy], len(orders.by_y))
            dis = _discordant_pairs(gx, y_within[rows_x], n_groups)
    rho = _pearson_by_group(gx, x_avg, y_avg, n, n_groups)
    return {"n": n, "n0": n * (n - 1) / 2, "n1": n1, "n2": n2, "n3": n3, "dis": dis, "rho": rho, "code": codes}


def _small_group_y_stats(
    group: np.ndarray, y: np.ndarray, n_groups: int, largest: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y ties and discordant pairs per group, and each element's average y rank in its group, for
    groups of at most ``largest`` elements in Knight's order: each element is compared with its
    neighbours up to ``largest - 1`` places on, so no second sort is needed."""
    below = np.zeros(len(y))  # others in the group with a smaller y
    equal = np.zeros(len(y))  # others in the group with the same y
    dis = np.zeros(n_groups)
    for d in range(1, largest):
        same = group[d:] == group[:-d]
        earlier, later = y[:-d], y[d:]
        greater = same & (earlier > later)  # x no larger, y larger: discordant (x ties are sorted by y)
        less = same & (earlier < later)
        tie = same & (earlier == later)
        dis += np.bincount(group[:-d], weights=greater, minlength=n_groups)
        below[:-d] += greater
        below[d:] += less
        equal[:-d] += tie
        equal[d:] += tie
    ties = np.bincount(group, weights=equal, minlength=n_groups) / 2
    return ties, 1 + below + equal / 2, dis


def _discordant_few(start: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Discordant pairs per group for a few large groups in Knight's order (group, x, y): scipy's
    compiled Fenwick-tree count when available, else the numpy bit passes."""
    ends = np.append(start[1:], len(rx))
    compiled = _compiled_discordant()
    if compiled is None:
        group = np.repeat(np.arange(len(start)), ends - start)
        return _discordant_pairs(group, ry.astype(np.int64), len(start))
    x, y = rx.astype(np.intp, copy=False), np.add(ry, 1, dtype=np.intp)  # the tree is 1-based
    return np.array([float(compiled(x[a:b], y[a:b])) if b - a > 1 else 0.0 for a, b in zip(start, ends)])


def _tau_b(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Kendall's tau-b per group from pair counts: (C - D) / sqrt((n0 - n1)(n0 - n2))."""
    n0, n1, n2, n3, dis = stats["n0"], stats["n1"], stats["n2"], stats["n3"], stats["dis"]
    concordant_minus_discordant = n0 - n1 - n2 + n3 - 2 * dis
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = concordant_minus_discordant / np.sqrt((n0 - n1) * (n0 - n2))
    return np.where((n0 - n1 > 0) & (n0 - n2 > 0), np.clip(tau, -1.0, 1.0), np.nan)


def _ties_and_average_ranks(
    group: np.ndarray, run_start: np.ndarray, group_start: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tied pairs per group, and each sorted element's average rank (1-based) within its group;
    ``group_start`` holds the position where each group begins."""
    if run_start.all():  # no ties: the rank is the position in the group
        ranks = np.arange(1, len(group) + 1, dtype=float)
        ranks -= group_start[group]
        return np.zeros(n_groups), ranks
    starts = np.flatnonzero(run_start)
    lengths = np.diff(np.append(starts, len(run_start)))
    ties = np.bincount(group[starts], weights=lengths * (lengths - 1) / 2.0, minlength=n_groups)
    average = (starts - group_start[group[starts]]) + (lengths + 1) / 2.0
    return ties, np.repeat(average, lengths)


def _pearson_by_group(group: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson correlation of a and b within each group (NaN when either is constant)."""

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=values, minlength=n_groups)

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = total(a) / n, total(b) / n
        da, db = a - mean_a[group], b - mean_b[group]
        cov, var_a, var_b = total(da * db), total(da * da), total(db * db)
        rho = cov / np.sqrt(var_a * var_b)
    return np.where((var_a > 0) & (var_b > 0), np.clip(rho, -1.0, 1.0), np.nan)


def _discordant_pairs(group: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, pairs i < j (same group, array order) with y_i > y_j, for ``group`` sorted and
    ``y`` non-negative integers. O(n log max(y)) numpy passes: bit b, most significant first,
    counts the pairs whose y first differ at b; elements are then stably partitioned by b."""
    out = np.zeros(n_groups, dtype=np.float64)
    n = len(y)
    if n < 2 or int(y.max()) == 0:
        return out
    bits = int(y.max()).bit_length()
    if n_groups <= _FEW_GROUPS:
        return _discordant_few_groups(group, y, n_groups, bits)
    key = (group.astype(np.int64) << bits) | y.astype(np.int64)
    index = np.arange(n, dtype=np.int64)
    for b in range(bits - 1, -1, -1):
        prefix = key >> (b + 1)
        starts = np.flatnonzero(np.concatenate(([True], prefix[1:] != prefix[:-1])))
        lengths = np.diff(np.append(starts, n))
        bit = (key >> b) & 1
        ones_excl = np.cumsum(bit) - bit
        ones_at_start = ones_excl[starts]
        ones_in = np.add.reduceat(bit, starts)
        zeros_in = lengths - ones_in
        ones_before_zeros = np.add.reduceat(np.where(bit == 0, ones_excl, 0), starts)
        contribution = ones_before_zeros - zeros_in * ones_at_start
        out += np.bincount(prefix[starts] >> (bits - b - 1), weights=contribution, minlength=n_groups)
        if b == 0:
            break
        start_of = np.repeat(starts, lengths)
        ones_rel = ones_excl - np.repeat(ones_at_start, lengths)
        new_position = np.where(bit == 0, index - ones_rel, start_of + np.repeat(zeros_in, lengths) + ones_rel)
        moved = np.empty_like(key)
        moved[new_position] = key
        key = moved
    return out


def _discordant_few_groups(group: np.ndarray, y: np.ndarray, n_groups: int, bits: int) -> np.ndarray:
    """The same count for a handful of groups, as a wavelet matrix: each level partitions the
    whole array stably by one bit, which keeps elements with equal higher bits contiguous."""
    out = np.zeros(n_groups, dtype=np.float64)
    n = len(y)
    gbits = max(int(n_groups - 1).bit_length(), 0)
    key = (group.astype(np.int64) << bits) | y.astype(np.int64)
    dtype = np.int32 if n < 2**31 else np.int64
    index = np.arange(n, dtype=dtype)
    for b in range(bits + gbits - 1, -1, -1):
        bit = ((key >> b) & 1).astype(dtype)
        ones_excl = np.cumsum(bit, dtype=dtype) - bit
        if b < bits:  # group bits never hold a discordant pair: the groups are sorted
            prefix = key >> (b + 1)
            starts = np.flatnonzero(np.concatenate(([True], prefix[1:] != prefix[:-1])))
            zeros_in = np.diff(np.append(starts, n)) - np.add.reduceat(bit, starts)
            ones_before_zeros = np.add.reduceat(np.where(bit == 0, ones_excl, 0).astype(np.int64), starts)
            contribution = ones_before_zeros - zeros_in * ones_excl[starts].astype(np.int64)
            out += np.bincount(prefix[starts] >> (bits - b - 1), weights=contribution, minlength=n_groups)
        if b == 0:
            break
        n_zeros = n - int(ones_excl[-1] + bit[-1])
        new_position = np.where(bit == 0, index - ones_excl, n_zeros + ones_excl)
        moved = np.empty_like(key)
        moved[new_position] = key
        key = moved
    return out


# --------------------------------------------------------------------------- worst pairs


def _worst_pairs(clean: pl.DataFrame, layout: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` pairs the prediction ranks most confidently wrong (most negative signed margin)."""
    if layout == "pairs":
        true_margin = pl.col("_tc") - pl.col("_tr") if "_tc" in clean.columns else pl.lit(1.0)
        frame = clean.lazy().select(
            pl.col("_id").alias(C.PAIR_ID),
            (pl.col("_pc") - pl.col("_pr")).alias("pred_margin"),
            true_margin.alias("true_margin"),
        )
    else:
        rows = clean.lazy().select(_P, _X, _Y).with_row_index("_row")
        frame = (
            rows.join(rows, on=_P, suffix="_b")
            .filter(pl.col(_X) > pl.col(f"{_X}_b"))
            .select(
                pl.format("{}>{}", "_row", "_row_b").alias("rows"),
                (pl.col(_Y) - pl.col(f"{_Y}_b")).alias("pred_margin"),
                (pl.col(_X) - pl.col(f"{_X}_b")).alias("true_margin"),
            )
        )
    worst = (
        frame.filter(pl.col("true_margin") != 0)
        .with_columns(signed_margin(pl.col("pred_margin"), pl.col("true_margin")).alias("signed_margin"))
        .sort("signed_margin")
        .head(k)
        .collect()
    )
    return worst.to_dicts()


# --------------------------------------------------------------------------- figure data


def figure_frames(
    data: Frame, *, pred: str = C.REWARD, true: str = C.SCORE, layout: str = "auto", max_rows: int = 200_000
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two frames for a figure (at most ``max_rows`` rows each): per response (``true``, ``pred``;
    for labels only: ``rejected``, ``chosen`` predicted rewards) and per pair (``true_margin``,
    ``outcome`` = 1 / 0.5 / 0, truth ties left out)."""
    lazy = data.lazy()
    names = lazy.collect_schema().names()
    layout = detect_layout(names, pred, layout)
    if layout == "pairs":
        has_true = C.chosen(true) in names and C.rejected(true) in names
        head = lazy.head(max_rows)
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
        rows = lazy.select(_long_columns(names, pred, true, [])).head(max_rows)
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
