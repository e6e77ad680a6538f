"""Does the single-label estimate's assumption hold? Flips that sit on close pairs, and the bounds that stay valid.

The mirror-tail estimate (:mod:`~prefnoise.noise_audit.estimate`) reads flips among the confident pairs (|m| above
its median) and assumes a flipped pair's margin is a mirrored clean margin, whatever the pair's difficulty. Real
judges err mostly on close pairs (flip probability rising as the true margin shrinks), and on a single label a
flip on a close pair looks exactly like the fold models' own mistake there: the own-error curve absorbs it, and ε̂
counts only the flips above the cut (on instance-dependent noise it reads about 0 where the truth is 0.2).

What stays valid without the mirror assumption:

- **at most** the models' disagreement with the labels, D = P(m < 0): per pair P(m < 0) = e + φ(1 − 2e) ≥ φ when
  the models' own chance e of a wrong sign and the flip chance φ are at most 1/2 and independent. It fails when
  the fold models learnt the labeller's bias (a flip the models repeat gets m > 0).
- **at least** the mirror interval's low end: flips seen among the confident pairs with the models' own errors
  at their most plausible; hidden flips (learnt bias) only add to the truth, and where the close pairs disagree
  more (the measured structure) the rate over all pairs is at least the confident pairs' rate.

The check: the disagreement share below vs above the median |m| (Wilson intervals, a two-proportion test), and
how far D's upper bound lies above the mirror interval. When it lies more than ``MAX_HIDDEN`` above and the close
pairs disagree significantly more, flips on close pairs could make up the difference: the interval's high end
becomes D's upper bound (with a note saying why), and where that interval is too wide to act on, the rate is
undetermined with the two bounds and the reason. Never the mirror interval alone, which the measured structure
does not support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prefnoise.noise import wilson_interval

MAX_HIDDEN = 0.05  # disagreement the mirror interval leaves unexplained before the verdict declines


@dataclass(frozen=True)
class DifficultyProfile:
    """The share of pairs whose margin disagrees with the label, below and above the median |m|, and overall."""

    close_share: float
    close_low: float
    close_high: float
    confident_share: float
    confident_low: float
    confident_high: float
    disagreement: float  # every pair, every refit (a zero margin counts 1/2)
    disagreement_high: float  # upper end of its 95% Wilson interval: the "at most" bound
    close_pairs: int
    confident_pairs: int

    @property
    def p_value(self) -> float:
        """Two-sided two-proportion z-test (pooled) of "close and confident pairs disagree equally often"."""
        n1, n2 = self.close_pairs, self.confident_pairs
        pooled = (self.close_share * n1 + self.confident_share * n2) / (n1 + n2)
        spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        if spread == 0:
            return 1.0
        return math.erfc(abs(self.close_share - self.confident_share) / spread / math.sqrt(2))  # 2·(1 − Φ(|z|))

    @property
    def ratio(self) -> float:
        """How many times more often close pairs disagree than confident ones (inf when confident never do)."""
        return self.close_share / self.confident_share if self.confident_share > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, the ratio included."""
        ratio = self.ratio
        return {**asdict(self), "ratio": ratio if np.isfinite(ratio) else None, "p_value": self.p_value}


def share_with_interval(negatives: float, pairs: int) -> tuple[float, float, float]:
    """(share, low, high): ``negatives`` of ``pairs`` (a fractional count is rounded) with its Wilson interval."""
    low, high = wilson_interval(int(round(negatives)), pairs)
    return (negatives / pairs if pairs else 0.5), low, high


def difficulty_profile(margins: np.ndarray) -> DifficultyProfile:
    """The disagreement shares of out-of-fold ``margins`` (one cross-fit, or refits × pairs; the close/confident
    split is on the mean margin over refits)."""
    sets = np.atleast_2d(np.asarray(margins, dtype=np.float64))
    combined = sets.mean(axis=0)
    magnitude = np.abs(combined)
    close = magnitude <= np.quantile(magnitude, 0.5)
    wrong = (combined < 0) + 0.5 * (combined == 0)
    every = float((sets < 0).mean() + 0.5 * (sets == 0).mean())  # the one tie rule: a tie counts 1/2
    close_share = share_with_interval(float(wrong[close].sum()), int(close.sum()))
    confident_share = share_with_interval(float(wrong[~close].sum()), int((~close).sum()))
    _, _, every_high = share_with_interval(every * combined.size, combined.size)
    return DifficultyProfile(
        *close_share, *confident_share, disagreement=every, disagreement_high=every_high,
        close_pairs=int(close.sum()), confident_pairs=int((~close).sum()),
    )


def close_pair_note(profile: DifficultyProfile, low: float, high: float) -> str | None:
    """Why the mirror interval [low, high] must reach up to the "at most" bound (None when it need not): the close
    pairs disagree with the labels more than the confident ones (two-proportion test, p < 0.05) and the
    disagreement lies more than ``MAX_HIDDEN`` above ``high``, so flips on close pairs may hide among what the
    estimate calls the fold models' own mistakes."""
    significant = profile.close_share > profile.confident_share and profile.p_value < 0.05
    if not significant or profile.disagreement_high - high <= MAX_HIDDEN:
        return None
    return (
        f"close pairs disagree with the labels {profile.ratio:.1f} times as often as confident ones "
        f"({profile.close_share:.1%} below the median |margin|, {profile.confident_share:.1%} above, "
        f"p = {profile.p_value:.2g}), and flips on "
        f"close pairs cannot be told from the fold models' own mistakes there: the rate is at least {low:.3f} "
        f"(flips seen among confident pairs) and at most {profile.disagreement_high:.3f} (the models' disagreement "
        "with the labels, valid unless they learnt the labeller's bias); annotators or a small gold set would "
        "decide it"
    )
