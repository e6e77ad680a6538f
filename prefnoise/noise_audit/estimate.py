"""How noisy is a preference dataset, and which pairs are suspect? Cross-fitted margins + a mixture.

1. Cross-fitting: pairs are split into K folds by a hash of pair_id; for each fold a reward model
   (symmetric loss by default, any fit-reward backend) is fitted on the other folds and scores the
   held-out fold, so every pair gets an out-of-fold margin m = r(chosen) − r(rejected) from a model
   that never saw its label. This is repeated R times (``refits``) with other fold assignments and
   seeds, so the fold models' own variability reaches the interval.
2. Under label flips that do not depend on the pair's content (symmetric noise, or class-conditional
   noise averaged over classes), a flipped pair's margin is a clean margin mirrored through 0:
   g(m) = (1 − ε)·f(m) + ε·f(−m). Among the confident pairs (|m| above its median t) the share τ with
   m < −t is τ = b + ε(1 − 2b), where b is the share of wrong signs the *clean* model would have there
   (its own confident mistakes). prefnoise reports ε̂ = (τ − b̂)/(1 − 2b̂).
3. When is ε identifiable? |m| carries no information about ε (flips only change signs), so b is
   read from the signs given |m|: the clean model's chance of a wrong sign at |m| = u·t is taken as
   e(u) = σ(−k·u) (exact for Gaussian clean margins, where k = 2μt/σ²; close to the probit shape of
   half-normal ones), and P(m < 0 | |m|) = e + ε(1 − 2e) is fitted by profile likelihood over k.
   b(k) is e averaged over the confident pairs; every k within χ²₁(0.95)/2 of the best fit is
   plausible, giving [b_low, b_high]. The rate is *identifiable* only if b_high ≤ ``MAX_OWN_ERROR``
   (the clean and mirrored modes are separated enough that flips are not confused with the model's
   own mistakes), each cross-fit has ``MIN_CONFIDENT_PAIRS`` confident pairs, and the 95% interval
   — pair bootstrap within each refit, pooled over refits, with b anywhere in [b_low, b_high] — is
   at most ``MAX_INTERVAL_WIDTH`` wide. Otherwise the rate is None with a reason, and the CLI exits
   ``UNDETERMINED_EXIT`` (4) for ``--estimate-only`` and ``--fix``. A model near chance has e ≈ 1/2
   everywhere: k and ε trade off along a flat ridge and b_high is large, so it is declined.
4. The suspicion of a pair is its posterior probability of being flipped under a mirrored Gaussian
   mixture (1 − ε̂)·N(μ, σ²) + ε̂·N(−μ, σ²) with ε̂ from step 2 and μ, σ fitted by EM: the closed
   form σ(log(ε/(1 − ε)) − 2μm/σ²), i.e. σ(−m) with a fitted scale and prior. Its ranking of pairs
   is the ranking by −m; the calibration matters for ``--threshold``, and there is none (suspicion
   is null) when ε̂ is undetermined.

Known limits: instance-dependent noise (close pairs flip more, as with Bradley–Terry annotators)
breaks the mirror assumption: flips concentrate below t, and ε̂ then counts only the flips the model
can see, so it is biased downward. Near ε = 0.5 the signs carry little information and the rate is
often declined unless there are many pairs. A pure Gaussian-mixture fit of ε was tried first: it
underestimated ε by about a quarter on linear-reward data (half-normal clean margins), and with ε
free its separation μ/σ confounds ε with the model's strength, so it does not decide identifiability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit.difficulty import close_pair_note, difficulty_profile

_EPS = 1e-9

# The identifiability verdict (step 3 above): one source for each limit.
MAX_OWN_ERROR = 0.2  # the fold models' own confident mistakes may be at most this share of the confident pairs
MAX_INTERVAL_WIDTH = 0.25  # a wider 95% interval says too little to act on
MIN_CONFIDENT_PAIRS = 100  # pairs with |m| above the cut, per cross-fit
PROFILE_DROP = 1.9207  # χ²₁(0.95)/2: own-error slopes within this log-likelihood of the best are plausible
SLOPES = np.geomspace(0.01, 1000.0, 101)  # own-error slopes k the profile tries, per unit of the cut t
_BOOT_CELLS = 4_000_000  # resampled margins held at once by the bootstrap (32 MB of float64)
_GROUPS = 400  # above this many pairs on a side of the cut, the slope fit uses quantile groups of |m|
UNDETERMINED_EXIT = 4  # the CLI's exit code for `--estimate-only` and `--fix` when ε̂ is undetermined
HELP_MORE = "a stronger reward model (a better backend, more epochs) or more pairs would help"


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
class OwnErrorFit:
    """The clean model's own-error curve e(u) = σ(−k·u) fitted on the signs given |m| = u·t."""

    slope: float  # k at the best fit
    rate: float  # ε at the best fit (the curve's own estimate; the report uses the corrected tail share)
    bias: float  # b̂: the own-error share among confident pairs at the best k
    bias_low: float  # the smallest and largest b over the plausible k (profile likelihood, 95%)
    bias_high: float
    cut: float  # t, the |m| cut
    confident_pairs: int


@dataclass
class NoiseEstimate:
    """ε̂ (None when undetermined, with the reason) with its interval, diagnostics and the suspicion mixture."""

    rate: float | None
    low: float | None
    high: float | None
    pairs: int
    mixture: MirrorMixture | None
    identifiable: bool = True
    reason: str | None = None
    tail_share: float | None = None
    own_error_bias: float | None = None
    own_error_bias_low: float | None = None
    own_error_bias_high: float | None = None
    own_error_slope: float | None = None
    confident_pairs: int | None = None
    label_agreement: float | None = None
    at_least: float | None = None  # bounds valid without the mirror assumption (noise_audit.difficulty)
    at_most: float | None = None
    close_pairs_note: str | None = None  # why the interval reaches up to ``at_most`` (close pairs disagree more)
    difficulty: dict[str, Any] | None = None  # disagreement below/above the median |margin|
    refits: list[dict[str, Any]] = field(default_factory=list)
    method: str = (
        "mirror-tail count on out-of-fold margins (|m| above its median), corrected for the models' own errors"
    )

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


def bootstrap_tail_rates(
    margins: np.ndarray, draws: int, rng: np.random.Generator, tail_quantile: float = 0.5
) -> np.ndarray:
    """:func:`mirror_tail_rate` of ``draws`` pair resamples of ``margins`` (each the next ``rng.integers(0, n, n)``
    draw, so the same numbers as one resample at a time), computed a block of resamples at a time."""
    m = np.asarray(margins, dtype=np.float64)
    rates = np.empty(draws)
    block = max(1, _BOOT_CELLS // max(m.size, 1))
    for start in range(0, draws, block):
        count = min(block, draws - start)
        sample = m[rng.integers(0, m.size, (count, m.size))]
        magnitude = np.abs(sample)
        confident = magnitude > np.quantile(magnitude, tail_quantile, axis=1)[:, None]
        kept = confident.sum(axis=1)
        negative = ((sample < 0) & confident).sum(axis=1)
        rates[start : start + count] = np.where(kept > 0, negative / np.maximum(kept, 1), 0.5)
    return rates


def own_error_share(slope: float | np.ndarray, u: np.ndarray) -> np.ndarray:
    """e(u) = σ(−k·u): the clean model's chance of a wrong sign at |m| = u·t (Gaussian clean margins: k = 2μt/σ²)."""
    return 0.5 * (1.0 - np.tanh(np.multiply(slope, u) / 2.0))


def wrong_sign_probability(own_error: np.ndarray, rate: float | np.ndarray) -> np.ndarray:
    """P(m < 0 | |m|) = e + ε(1 − 2e): a clean pair is wrong with chance e, a flipped one with 1 − e."""
    return own_error + np.multiply(rate, 1.0 - 2.0 * own_error)


def corrected_rate(tail_share: float | np.ndarray, bias: float) -> float | np.ndarray:
    """ε = (τ − b)/(1 − 2b), from τ = b + ε(1 − 2b); clipped to [0, 0.5]."""
    return np.clip((np.asarray(tail_share) - bias) / (1.0 - 2.0 * bias), 0.0, 0.5)


def _grouped(u: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, negatives, pairs) per group: each pair alone, or quantile groups of |m| when there are many."""
    if u.size <= _GROUPS:
        return u, negative.astype(np.float64), np.ones(u.size)
    order = np.argsort(u, kind="mergesort")
    chunks = np.array_split(order, _GROUPS)
    return (
        np.array([u[c].mean() for c in chunks]),
        np.array([negative[c].sum() for c in chunks], dtype=np.float64),
        np.array([c.size for c in chunks], dtype=np.float64),
    )


def _best_rates(own: np.ndarray, negatives: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``own`` (one slope), the ε in [0, 0.5] maximizing the sign likelihood, and that maximum."""

    def gradient(rate: np.ndarray) -> np.ndarray:  # d log-likelihood / dε, decreasing in ε (concave)
        p = np.clip(wrong_sign_probability(own, rate[:, None]), 1e-300, 1 - 1e-16)
        return ((1 - 2 * own) * (negatives / p - (pairs - negatives) / (1 - p))).sum(axis=1)

    low, high = np.zeros(own.shape[0]), np.full(own.shape[0], 0.5)
    for _ in range(30):  # bisection on the gradient's sign; the ends stay when the optimum is on the boundary
        mid = (low + high) / 2
        up = gradient(mid) > 0
        low, high = np.where(up, mid, low), np.where(up, high, mid)
    rate = (low + high) / 2
    p = np.clip(wrong_sign_probability(own, rate[:, None]), 1e-300, 1 - 1e-16)
    loglik = (negatives * np.log(p) + (pairs - negatives) * np.log1p(-p)).sum(axis=1)
    return rate, loglik


def fit_own_error(margins: np.ndarray, tail_quantile: float = 0.5) -> OwnErrorFit:
    """Profile likelihood of the own-error slope k on P(m < 0 | |m|): the best k and ε, b̂ and [b_low, b_high]."""
    m = np.asarray(margins, dtype=np.float64)
    magnitude = np.abs(m)
    cut = float(np.quantile(magnitude, tail_quantile))
    confident = magnitude > cut
    if cut <= 0 or not confident.any():
        return OwnErrorFit(math.nan, math.nan, 0.5, 0.5, 0.5, cut, int(confident.sum()))
    u = magnitude / cut
    u_all, negatives, pairs = _grouped(u, m < 0)
    own = own_error_share(SLOPES[:, None], u_all[None, :])
    rates, loglik = _best_rates(own, negatives, pairs)
    u_confident = _grouped(u[confident], np.zeros(int(confident.sum()), dtype=bool))
    biases = (own_error_share(SLOPES[:, None], u_confident[0][None, :]) * u_confident[2]).sum(axis=1)
    biases /= u_confident[2].sum()
    best = int(np.argmax(loglik))
    plausible = loglik >= loglik[best] - PROFILE_DROP
    plausible[1:] |= plausible[:-1].copy()  # one grid step either way: the true slope may lie between two
    plausible[:-1] |= plausible[1:].copy()
    return OwnErrorFit(
        slope=float(SLOPES[best]),
        rate=float(rates[best]),
        bias=float(biases[best]),
        bias_low=float(biases[plausible].min()),
        bias_high=float(biases[plausible].max()),
        cut=cut,
        confident_pairs=int(confident.sum()),
    )


def identifiability_reason(
    confident_pairs: int, bias_high: float, low: float | None, high: float | None, agreement: float
) -> str | None:
    """Why ε cannot be read from these margins (None when it can): too few confident pairs, the models' own
    confident errors possibly above ``MAX_OWN_ERROR``, or an interval wider than ``MAX_INTERVAL_WIDTH``."""
    if confident_pairs < MIN_CONFIDENT_PAIRS:
        return (
            f"only {confident_pairs} confident pairs (|margin| above its median), at least {MIN_CONFIDENT_PAIRS} "
            "are needed; more pairs would help"
        )
    if not bias_high <= MAX_OWN_ERROR:
        return (
            f"the fold models' own confident mistakes cannot be told apart from flips: up to {bias_high:.0%} of the "
            f"confident pairs may have the wrong sign through the model alone (at most {MAX_OWN_ERROR:.0%} "
            f"allowed; the models agree with the labels on {agreement:.1%} of pairs); {HELP_MORE}"
        )
    if low is not None and high is not None and high - low > MAX_INTERVAL_WIDTH:
        return (
            f"the 95% interval {low:.3f}–{high:.3f} is wider than {MAX_INTERVAL_WIDTH}; "
            "more pairs or more --refits would help"
        )
    return None


def estimate_noise_rate(
    margins: np.ndarray, *, n_boot: int = 200, seed: int = C.DEFAULT_SEED, tail_quantile: float = 0.5
) -> NoiseEstimate:
    """ε̂ from out-of-fold margins — one cross-fit (1-D) or R refits (R × pairs) — with a 95% interval
    (pair bootstrap within each refit, pooled, own-error bias anywhere in its plausible range), the
    identifiability verdict and the suspicion mixture (None when undetermined)."""
    sets = np.atleast_2d(np.asarray(margins, dtype=np.float64))
    if sets.shape[1] < 2 or not np.isfinite(sets).all():
        raise PrefnoiseError("noise estimate needs at least two finite out-of-fold margins")
    if not 0.0 <= tail_quantile < 1.0:
        raise PrefnoiseError(f"tail quantile must be within [0, 1), got {tail_quantile}")
    rng = np.random.default_rng(seed)
    fits = [fit_own_error(m, tail_quantile) for m in sets]
    tails = [mirror_tail_rate(m, tail_quantile) for m in sets]
    bias_low = float(np.mean([f.bias_low for f in fits]))
    bias_high = float(np.mean([f.bias_high for f in fits]))
    determined = all(f.bias_high < 0.5 for f in fits)  # b = 1/2: every sign could be the model's own
    per_refit = [float(corrected_rate(tail, fit.bias)) if determined else None for tail, fit in zip(tails, fits)]
    low = high = None
    if n_boot > 0 and determined:
        lows, highs = [], []
        for m, fit in zip(sets, fits):  # within each refit: pairs resampled, its bias anywhere in its range
            draws = bootstrap_tail_rates(m, n_boot, rng, tail_quantile)
            lows.append(corrected_rate(draws, fit.bias_high))
            highs.append(corrected_rate(draws, fit.bias_low))
        low = float(np.quantile(np.concatenate(lows), 0.025))
        high = float(np.quantile(np.concatenate(highs), 0.975))
    agreement = float((sets > 0).mean() + 0.5 * (sets == 0).mean())  # the one tie rule: a tie counts 1/2
    confident = min(f.confident_pairs for f in fits)
    worst = bias_high if determined else max(f.bias_high for f in fits)  # one refit without signal decides
    reason = identifiability_reason(confident, worst, low, high, agreement)
    if any(f.cut <= 0 for f in fits):
        reason = f"most out-of-fold margins are exactly 0 (the fold models score both responses alike); {HELP_MORE}"
    profile = difficulty_profile(sets)
    at_least = low if reason is None else None  # the bounds that hold without the mirror assumption
    note = close_pair_note(profile, low, high) if reason is None and low is not None and high is not None else None
    if note is not None:  # flips may hide on close pairs: the interval reaches up to the disagreement
        high = profile.disagreement_high
        reason = note if high - low > MAX_INTERVAL_WIDTH else None
    rate = float(np.mean(per_refit)) if reason is None else None
    combined = sets.mean(axis=0)
    return NoiseEstimate(
        rate=rate,
        low=low if reason is None else None,
        high=high if reason is None else None,
        pairs=int(sets.shape[1]),
        mixture=fit_mirror_mixture(combined, rate=rate) if rate is not None else None,
        identifiable=reason is None,
        reason=reason,
        tail_share=float(np.mean(tails)),
        own_error_bias=float(np.mean([f.bias for f in fits])),
        own_error_bias_low=bias_low,
        own_error_bias_high=bias_high,
        own_error_slope=float(np.mean([f.slope for f in fits])),
        confident_pairs=confident,
        label_agreement=agreement,
        at_least=at_least,
        at_most=profile.disagreement_high,
        close_pairs_note=note if reason is None else None,
        difficulty=profile.to_dict(),
        refits=[
            {
                "tail_share": tail,
                "own_error_bias": fit.bias,
                "own_error_bias_high": fit.bias_high,
                "rate": r if reason is None else None,
            }
            for tail, fit, r in zip(tails, fits, per_refit)
        ],
    )

