"""The flip rate of a table's labels from a small gold set plus the fold models (prediction-powered inference).

How the audit command calls it (``audit --gold COL``, ``pn.audit(..., gold="COL")``): after the out-of-fold
margins exist (cross-fitted, or given by ``--margin-col``/``--reward-col``),

    scored, estimate, extra = gold_evidence(scored, options.gold)   # scored has oof_margin
    summary.update(extra)       # "method": "gold", "noise_rate": {rate, low, high, gold_low, gold_high, ...}

(``gold_estimate_of`` is the estimate alone.) Bad votes raise a PrefnoiseError naming the column and the first
bad row (exit 2), as do a missing column and a column with no gold vote at all. The gold pairs must be a random
sample of the table. Suspicion is the mirror mixture's posterior at the gold-backed rate, and the gold vote itself
on the gold pairs (``--fix swap`` then also turns the gold column round, as the annotators' columns).

The estimator (Angelopoulos et al., Science 2023, with the power tuning of their PPI++ paper, 2023): N pairs
without gold carry the model's score f_i of "the label is wrong"; n gold pairs carry the truth w_j and f_j.
θ̂ = λ·mean_N(f) + mean_n(w − λf), 95% interval θ̂ ± z·sqrt(λ²·var_N(f)/N + var_n(w − λf)/n).

Why it covers: the gold pairs are a random sample of the same table, so E[mean_n(w − λf)] = θ − λ·E[f] and
E[λ·mean_N(f)] = λ·E[f] for any fixed λ and any f — the rectifier removes the model's bias whatever the model
is. The two means are independent (disjoint pairs), so their variances add and the central limit theorem gives
the normal interval. λ̂ = cov_n(w, f)/((1 + n/N)·var(f)) minimizes that variance and converges to a constant, so
the interval keeps its level asymptotically (PPI++, Theorem 1). With λ = 0 it is the gold-only Wald interval;
an informative f (w − λf has less spread than w) makes it narrower. Because f is only used through λ·f, any
increasing affine rescaling of f (a calibration) gives the same interval.

Small gold sets: the normal interval is trusted only where the gold pairs hold at least ``MIN_EACH_SIDE`` wrong
and as many right labels (the usual np ≥ 10 rule for a normal approximation of a proportion; with 5 wrong labels in
100 it covers about 88% at the 95% level) and where it is narrower than the exact (Clopper–Pearson) gold-only
interval; otherwise the combined interval *is* the gold-only one (``interval`` says which), so an uninformative
model never buys a narrower interval than the gold votes alone justify.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import binomtest, norm

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit import votes as V
from prefnoise.noise_audit.estimate import fit_mirror_mixture
from prefnoise.noise_audit.fix import add_suspicion
from prefnoise.noise_audit.names import MARGIN, SUSPICION

Z95 = float(norm.ppf(0.975))
MIN_GOLD_PAIRS = 10  # fewer trusted votes than this say too little for any interval
MIN_EACH_SIDE = 10  # wrong and right gold labels each, for the normal (prediction-powered) interval


@dataclass(frozen=True)
class GoldEstimate:
    """The flip rate from gold pairs + model (``rate``, ``low``, ``high``) and from the gold pairs alone."""

    rate: float
    low: float
    high: float
    pairs: int  # every pair of the table
    gold_pairs: int  # pairs with a gold preference (ties and nulls excluded)
    gold_ties: int
    gold_rate: float
    gold_low: float  # exact (Clopper–Pearson) 95% interval of the gold pairs alone
    gold_high: float
    model_weight: float  # λ̂: how much of the model's score the estimate uses (0: none)
    identifiable: bool = True
    reason: str | None = None
    method: str = "gold"
    interval: str = "prediction-powered (PPI++): gold pairs correct the fold models' out-of-fold scores"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


def gold_wrong(values: pl.Series, column: str) -> np.ndarray:
    """Per pair: 1.0 where the gold vote prefers ``rejected`` (the table's label is wrong), 0.0 where it prefers
    ``chosen``, 0.5 for a tie, NaN where there is no vote (null); the encodings of :mod:`.votes`. A PrefnoiseError
    names the column and the first bad row, or says that no row has a gold preference."""
    codes = V.vote_codes(values, column, where="--gold: ")
    wrong = np.select([codes == V.CHOSEN, codes == V.REJECTED, codes == V.TIE], [0.0, 1.0, 0.5], np.nan)
    if not np.isin(codes, (V.CHOSEN, V.REJECTED)).any():
        raise PrefnoiseError(
            f"--gold: column {column!r} has no gold vote for chosen or rejected on any row (all null or tie)"
        )
    return wrong


def label_wrong_score(margins: np.ndarray) -> np.ndarray:
    """The model's score that a pair's label is wrong: σ(−m/s), s the median |m| (any monotone score would do;
    the estimate is unchanged by rescaling it, and its validity does not depend on it)."""
    m = np.asarray(margins, dtype=np.float64)
    scale = float(np.median(np.abs(m))) or 1.0
    return 0.5 * (1.0 - np.tanh(m / scale / 2.0))


def exact_interval(successes: int, n: int) -> tuple[float, float]:
    """The Clopper–Pearson 95% interval of a binomial proportion."""
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def ppi_mean(
    unlabelled: np.ndarray, scored: np.ndarray, truth: np.ndarray, z: float = Z95
) -> tuple[float, float, float]:
    """(θ̂, half-width, λ̂): the power-tuned prediction-powered mean of ``truth`` from the model's scores on the
    unlabelled pairs and on the labelled ones (``scored``, aligned with ``truth``)."""
    f_n, w = np.asarray(scored, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    f_big = np.asarray(unlabelled, dtype=np.float64)
    n, big = w.size, f_big.size
    if big < 2 or n < 2:
        return float(w.mean()), z * float(w.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf, 0.0
    spread = float(np.var(np.concatenate([f_big, f_n]), ddof=1))
    weight = 0.0 if spread == 0 else float(np.cov(w, f_n, ddof=1)[0, 1]) / ((1 + n / big) * spread)
    weight = max(weight, 0.0)  # a score that tracks errors backwards is not trusted
    estimate = weight * float(f_big.mean()) + float((w - weight * f_n).mean())
    variance = weight**2 * float(np.var(f_big, ddof=1)) / big + float(np.var(w - weight * f_n, ddof=1)) / n
    return estimate, z * math.sqrt(variance), weight


def gold_noise_rate(score: np.ndarray, wrong: np.ndarray) -> GoldEstimate:
    """The flip rate with a 95% interval from every pair's model ``score`` and the gold pairs' ``wrong``
    (1/0; 0.5 a gold tie, left out: it says neither response is better; NaN without gold), beside the gold-only
    exact interval (see the module docstring)."""
    f = np.asarray(score, dtype=np.float64)
    w = np.asarray(wrong, dtype=np.float64)
    if f.shape != w.shape or not np.isfinite(f).all():
        raise PrefnoiseError("gold estimate needs one finite model score per pair")
    has_gold = np.isin(w, (0.0, 1.0))
    ties = int((w == 0.5).sum())
    n = int(has_gold.sum())
    successes = int(w[has_gold].sum())
    gold_low, gold_high = exact_interval(successes, n) if n else (0.0, 1.0)
    gold_rate = successes / n if n else math.nan
    common = {"pairs": int(f.size), "gold_pairs": n, "gold_ties": ties, "gold_rate": gold_rate,
              "gold_low": gold_low, "gold_high": gold_high}
    if n < MIN_GOLD_PAIRS:
        return GoldEstimate(rate=math.nan, low=math.nan, high=math.nan, model_weight=0.0, identifiable=False,
                            reason=f"only {n} gold pairs; at least {MIN_GOLD_PAIRS} are needed", **common)
    if min(successes, n - successes) < MIN_EACH_SIDE:
        return GoldEstimate(rate=gold_rate, low=gold_low, high=gold_high, model_weight=0.0, **common, interval=(
            f"gold pairs only (exact Clopper–Pearson): fewer than {MIN_EACH_SIDE} wrong or right gold labels "
            "are too few for the normal approximation"))
    rate, half, weight = ppi_mean(f[~has_gold], f[has_gold], w[has_gold])
    low, high = max(rate - half, 0.0), min(rate + half, 1.0)
    if high - low >= gold_high - gold_low:  # the model buys nothing: the gold votes alone decide
        return GoldEstimate(rate=gold_rate, low=gold_low, high=gold_high, model_weight=0.0, **common, interval=(
            "gold pairs only (exact Clopper–Pearson): the model's scores did not narrow it"))
    return GoldEstimate(rate=min(max(rate, 0.0), 1.0), low=low, high=high, model_weight=weight, **common)


def gold_estimate_of(frame: pl.DataFrame, gold_col: str, margin_col: str = MARGIN) -> GoldEstimate:
    """``gold_noise_rate`` of a scored table: the gold votes in ``gold_col``, the out-of-fold margins in
    ``margin_col``."""
    if gold_col not in frame.columns:
        raise PrefnoiseError(f"--gold: column {gold_col!r} not found; the table has {C.name_list(frame.columns)}")
    return gold_noise_rate(label_wrong_score(frame[margin_col].to_numpy()), gold_wrong(frame[gold_col], gold_col))


def gold_evidence(scored: pl.DataFrame, gold_col: str) -> tuple[pl.DataFrame, GoldEstimate, dict[str, Any]]:
    """The scored table (with ``oof_margin``) plus ``suspicion`` at the gold-backed rate (the gold vote itself on
    gold pairs; null when undetermined),
    the gold estimate, and the summary entries it sets (``method``, ``identifiable``, ``noise_rate`` with the
    suspicion ``mixture``)."""
    estimate = gold_estimate_of(scored, gold_col)
    mixture = fit_mirror_mixture(scored[MARGIN].to_numpy(), rate=estimate.rate) if estimate.identifiable else None
    rate = {**estimate.to_dict(), "mixture": None if mixture is None else asdict(mixture)}
    extra = {"method": "gold", "identifiable": estimate.identifiable, "noise_rate": rate}
    scored = add_suspicion(scored, mixture)
    if mixture is not None:  # a gold pair's truth is known: suspicion 1 where gold prefers rejected, 0 where chosen
        wrong = pl.Series(gold_wrong(scored[gold_col], gold_col))
        known = wrong.is_in([0.0, 1.0])
        scored = scored.with_columns(pl.when(known).then(wrong).otherwise(pl.col(SUSPICION)).alias(SUSPICION))
    return scored, estimate, extra
