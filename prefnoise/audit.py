"""How noisy is a preference dataset, and which pairs are suspect? Cross-fitted margins + a mixture.

1. Cross-fitting: pairs are split into K folds by a hash of pair_id; for each fold a reward model
   (symmetric loss by default, any fit-reward backend) is fitted on the other folds and scores the
   held-out fold, so every pair gets an out-of-fold margin m = r(chosen) − r(rejected) from a model
   that never saw its label.
2. Under label flips that do not depend on the pair's content (symmetric noise, or class-conditional
   noise averaged over classes), a flipped pair's margin is a clean margin mirrored through 0:
   g(m) = (1 − ε)·f(m) + ε·f(−m). Where the model is confident (|m| large) clean pairs almost never
   have the wrong sign, so among pairs with |m| > t the share with m < −t estimates ε. prefnoise
   takes t = the median of |m| (``tail_quantile``), which discards the close pairs where a model's
   own mistakes live, whatever the shape of f; a bootstrap over pairs gives the interval.
3. The suspicion of a pair is its posterior probability of being flipped under a mirrored Gaussian
   mixture (1 − ε̂)·N(μ, σ²) + ε̂·N(−μ, σ²) with ε̂ from step 2 and μ, σ fitted by EM: the closed
   form σ(log(ε/(1 − ε)) − 2μm/σ²), i.e. σ(−m) with a fitted scale and prior. Its ranking of pairs
   is the ranking by −m; the calibration matters for ``--threshold``.

Known bias: clean pairs the model gets confidently wrong (|m| > t with the wrong sign) are counted as
flips, so ε̂ is biased upward for a weak model, and toward 0.5 for a model that learned nothing.
Instance-dependent noise (close pairs flip more, as with Bradley–Terry annotators) breaks the mirror
assumption: flips concentrate below t, and ε̂ then counts only the flips the model can see, so it
is biased downward. A pure Gaussian-mixture fit of ε was tried first and underestimated ε by about a
quarter on linear-reward data, whose clean margins are half-normal rather than Gaussian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import swap_responses

MARGIN = "oof_margin"
SUSPICION = "suspicion"
FOLD = "fold"
_EPS = 1e-9


@dataclass
class MirrorMixture:
    """The fitted margin mixture: flipped share, clean-margin mean and spread."""

    rate: float
    mean: float
    std: float
    iterations: int
    converged: bool

    def posterior_flipped(self, margins: np.ndarray) -> np.ndarray:
        """P(flipped | margin) under the mixture: σ(log(ε/(1−ε)) − 2μm/σ²)."""
        rate = min(max(self.rate, _EPS), 1 - _EPS)
        logit = math.log(rate / (1 - rate)) - 2.0 * self.mean * np.asarray(margins, dtype=np.float64) / self.std**2
        return 0.5 * (1.0 - np.tanh(-logit / 2.0))  # σ(logit), stable


@dataclass
class NoiseEstimate:
    """ε̂ with its bootstrap interval, the mixture behind it, and the method's name."""

    rate: float
    low: float | None
    high: float | None
    pairs: int
    mixture: MirrorMixture
    method: str = "mirror-tail count on out-of-fold margins (|m| above its median)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


def fit_mirror_mixture(
    margins: np.ndarray, *, rate: float | None = None, max_iter: int = 500, tol: float = 1e-8
) -> MirrorMixture:
    """EM for g(m) = (1−ε)N(μ, σ²) + εN(−μ, σ²), μ ≥ 0, ε ≤ 0.5; ``rate`` fixes ε and fits μ, σ only."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size < 2 or not np.isfinite(m).all():
        raise PrefnoiseError("noise estimate needs at least two finite out-of-fold margins")
    mean = max(float(np.mean(np.abs(m))), 1e-6)
    std = max(float(np.std(m)), 1e-6)
    current = 0.25 if rate is None else rate
    second = float(np.mean(m**2))
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007
        flipped = MirrorMixture(current, mean, std, 0, False).posterior_flipped(m)  # E step
        new_rate = float(flipped.mean()) if rate is None else rate
        new_mean = max(float(((1.0 - 2.0 * flipped) * m).mean()), 1e-9)  # flipped margins mirrored back
        new_std = math.sqrt(max(second - new_mean**2, 1e-12))
        new_rate = min(new_rate, 1.0 - new_rate)  # the mirror image is the same mixture with ε ≤ 0.5
        change = abs(new_rate - current) + (abs(new_mean - mean) + abs(new_std - std)) / (std + 1e-12)
        current, mean, std = new_rate, new_mean, new_std
        if change < tol:
            converged = True
            break
    return MirrorMixture(rate=current, mean=mean, std=std, iterations=iteration, converged=converged)


def mirror_tail_rate(margins: np.ndarray, tail_quantile: float = 0.5) -> float:
    """Share of negative margins among those with |m| above the ``tail_quantile`` of |m|."""
    m = np.asarray(margins, dtype=np.float64)
    threshold = float(np.quantile(np.abs(m), tail_quantile))
    confident = np.abs(m) > threshold
    if not confident.any():
        return 0.5
    return float((m[confident] < 0).mean())


def estimate_noise_rate(
    margins: np.ndarray, *, n_boot: int = 200, seed: int = C.DEFAULT_SEED, tail_quantile: float = 0.5
) -> NoiseEstimate:
    """ε̂ from out-of-fold margins (mirror-tail count), a 95% bootstrap interval, and the suspicion mixture."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size < 2 or not np.isfinite(m).all():
        raise PrefnoiseError("noise estimate needs at least two finite out-of-fold margins")
    if not 0.0 <= tail_quantile < 1.0:
        raise PrefnoiseError(f"tail quantile must be within [0, 1), got {tail_quantile}")
    rate = mirror_tail_rate(m, tail_quantile)
    low = high = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        rates = [mirror_tail_rate(m[rng.integers(0, m.size, m.size)], tail_quantile) for _ in range(n_boot)]
        low, high = (float(q) for q in np.quantile(rates, [0.025, 0.975]))
    mixture = fit_mirror_mixture(m, rate=rate)
    return NoiseEstimate(rate=rate, low=low, high=high, pairs=int(m.size), mixture=mixture)


def out_of_fold_margins(
    frame: pl.DataFrame,
    *,
    folds: int = 5,
    seed: int = C.DEFAULT_SEED,
    fit_options: dict[str, Any] | None = None,
    device: str = "auto",
    on_fold: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """``frame`` with ``fold`` and ``oof_margin``: each pair scored by a model fitted on the other folds."""
    from prefnoise.reward import fit_reward_model, fold_of_pair_id, score_table

    if folds < 2:
        raise PrefnoiseError(f"--folds must be at least 2, got {folds}")
    if frame.height < 2 * folds:
        raise PrefnoiseError(f"{frame.height} pairs are too few for {folds} folds; use fewer --folds")
    options = {"loss": "sigmoid", **(fit_options or {})}
    fold = np.asarray(fold_of_pair_id(frame[C.PAIR_ID], folds, seed))
    margins = np.full(frame.height, np.nan)
    for k in range(folds):
        held_out = fold == k
        fit = fit_reward_model(frame.filter(pl.Series(~held_out)), seed=seed + k, device=device, **options)
        scored = score_table(fit.model, frame.filter(pl.Series(held_out)), device=device)
        margins[held_out] = (scored[C.chosen(C.REWARD)] - scored[C.rejected(C.REWARD)]).to_numpy()
        if on_fold is not None:
            on_fold(1)
    return frame.with_columns(pl.Series(FOLD, fold, dtype=pl.Int32), pl.Series(MARGIN, margins, dtype=pl.Float64))


def add_suspicion(frame: pl.DataFrame, mixture: MirrorMixture) -> pl.DataFrame:
    """``frame`` (with ``oof_margin``) plus ``suspicion`` = P(flipped | margin)."""
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
    """The ``k`` most suspect pairs: ids, margins and suspicion (text only when asked)."""
    columns = [C.PAIR_ID, MARGIN, SUSPICION] + ([C.PROMPT, C.CHOSEN, C.REJECTED] if with_text else [])
    return frame.sort(SUSPICION, descending=True).head(k).select(columns).to_dicts()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of the ``k`` highest-scored items that are positive."""
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores), kind="mergesort")[:k]
    return float(np.asarray(labels, dtype=bool)[top].mean())
