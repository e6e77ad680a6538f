"""Dawid–Skene EM on a preference table's votes, fitted on vote patterns and on many bootstrap weights at once.

Each pair has a hidden truth y ∈ {0, 1}, the response that is really better, in one of two frames:

- the *position frame* (when it is known which response was shown first): y = 0 when the first-shown
  response is better. Each annotator k, the table's own label included, votes ℓ ∈ {0, 1, tie} with
  probability π_k[y, ℓ], a full 2×3 confusion, so class-conditional flip rates and position bias are
  estimated;
- the *table frame* (otherwise): y = 0 when ``chosen`` is better. The table's label always says 0 and
  carries no information beyond the prior P(y = 1), which is its flip rate. Annotators' confusions are
  *symmetric* there (π_k[y, y] = a_k, π_k[y, 1 − y] = d_k, π_k[y, tie] = t_k): which response the table
  put in ``chosen`` says nothing about an independent annotator, and the symmetric model is identified
  with two other annotators, where a full one would need three.

EM: the E-step is P(y | votes) ∝ p(y) Π_k π_k[y, ℓ_k] over the votes a pair has; the M-step sets π_k and
p(y) from posterior-weighted counts plus ``pseudo_count`` in every cell (a small Dirichlet prior that
keeps unseen cells off zero). The start is the majority vote (a tie counts half for each side), so the
classes cannot swap while the annotators beat chance. Pairs with the same votes share a posterior, so
the EM runs on distinct vote patterns with their counts as weights; a bootstrap over pairs is a
multinomial draw of those counts, and all draws are fitted together as one batch of arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefnoise.noise_audit.votes import CHOSEN, MISSING, REJECTED, TIE

PSEUDO_COUNT = 0.5  # added to every confusion cell and to each class of the prior
MAX_ITERATIONS = 1000
TOLERANCE = 1e-7  # largest change of any posterior between two iterations
_TINY = 1e-300
_CELLS_PER_CHUNK = 4_000_000  # bootstrap draws × patterns × annotators fitted per batch (memory bound)


@dataclass
class DawidSkeneFit:
    """One EM fit per row of weights: prior (B, S, 2) per stratum, confusion (B, K, 2, 3), posterior (B, P, 2) and the
    posterior-weighted vote counts (B, K, 2, 3) without pseudo-counts."""

    prior: np.ndarray
    confusion: np.ndarray
    posterior: np.ndarray
    counts: np.ndarray
    iterations: int
    converged: bool


def to_frame(codes: np.ndarray, chosen_first: np.ndarray | None) -> np.ndarray:
    """Vote codes relative to ``chosen`` → classes of the frame (0, 1, 2 = tie, 3 = missing): unchanged in
    the table frame (``chosen_first`` None); in the position frame, 0 = the first-shown response."""
    if chosen_first is None:
        return codes.astype(np.int8)
    second = ~np.asarray(chosen_first, dtype=bool)[:, None]
    out = codes.astype(np.int8).copy()
    out[second & (codes == CHOSEN)] = 1
    out[second & (codes == REJECTED)] = 0
    return out


def majority_start(votes: np.ndarray) -> np.ndarray:
    """(P, 2) starting posteriors: the share of votes for each class, a tie counting half (½ with no votes)."""
    first = (votes == 0).sum(axis=1) + 0.5 * (votes == TIE).sum(axis=1)
    total = (votes != MISSING).sum(axis=1)
    share = np.where(total > 0, first / np.maximum(total, 1), 0.5)
    return np.stack([share, 1.0 - share], axis=1)


def one_hot(votes: np.ndarray) -> np.ndarray:
    """(P, K·3) indicators of each annotator's vote (0, 1, tie); a missing vote has none."""
    patterns, annotators = votes.shape
    hot = np.zeros((patterns, annotators, 3))
    for category in range(3):
        hot[:, :, category] = votes == category
    return hot.reshape(patterns, annotators * 3)


def m_step(
    posterior: np.ndarray,
    weights: np.ndarray,
    hot: np.ndarray,
    pseudo_count: float,
    symmetric: bool,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prior (B, S, 2), confusion (B, K, 2, 3), raw counts (B, K, 2, 3)) from posteriors (B, P, 2) and
    weights (B, P); one prior per stratum (``strata``: each pattern's, 0..S−1; one stratum when None)."""
    weighted = posterior * weights[:, :, None]
    draws, annotators = weights.shape[0], hot.shape[1] // 3
    counts = (weighted.transpose(0, 2, 1) @ hot).reshape(draws, 2, annotators, 3).transpose(0, 2, 1, 3)
    smoothed = counts + pseudo_count
    if symmetric:  # pool "votes for the truth", "for the other", "tie" over both classes
        right = smoothed[:, :, 0, 0] + smoothed[:, :, 1, 1]
        wrong = smoothed[:, :, 0, 1] + smoothed[:, :, 1, 0]
        tie = smoothed[:, :, 0, 2] + smoothed[:, :, 1, 2]
        smoothed = np.stack(
            [np.stack([right, wrong, tie], axis=-1), np.stack([wrong, right, tie], axis=-1)], axis=2
        )
    confusion = smoothed / smoothed.sum(axis=3, keepdims=True)
    membership = _membership(strata, weights.shape[1])
    prior = np.einsum("bpy,ps->bsy", weighted, membership) + pseudo_count
    return prior / prior.sum(axis=2, keepdims=True), confusion, counts


def _membership(strata: np.ndarray | None, patterns: int) -> np.ndarray:
    """(P, S) indicators of each pattern's stratum."""
    if strata is None:
        return np.ones((patterns, 1))
    return (np.asarray(strata)[:, None] == np.arange(int(np.max(strata)) + 1)[None, :]).astype(np.float64)


def e_step(prior: np.ndarray, confusion: np.ndarray, hot: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
    """(B, P, 2) posteriors P(y | a pattern's votes), with the prior (B, S, 2) of each pattern's stratum."""
    draws, annotators = confusion.shape[:2]
    log_confusion = np.log(np.maximum(confusion, _TINY)).transpose(0, 2, 1, 3).reshape(draws, 2, annotators * 3)
    log_prior = np.log(np.maximum(prior, _TINY))[:, 0 if strata is None else np.asarray(strata), :]
    log_joint = (log_confusion @ hot.T).transpose(0, 2, 1) + (log_prior if strata is not None else log_prior[:, None])
    log_joint -= log_joint.max(axis=2, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(axis=2, keepdims=True)


def fit_dawid_skene(
    votes: np.ndarray,
    weights: np.ndarray,
    *,
    symmetric: bool = False,
    strata: np.ndarray | None = None,
    pseudo_count: float = PSEUDO_COUNT,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> DawidSkeneFit:
    """EM on vote patterns ``votes`` (P × K frame classes) with pattern weights (P,) or (B, P), one fit per
    row; every fit starts from the majority vote. ``strata`` (P,) gives each stratum its own prior."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    hot = one_hot(votes)
    posterior = np.broadcast_to(majority_start(votes), (weights.shape[0], *votes.shape[:1], 2)).copy()
    converged = False
    iteration = 0
    for iteration in range(1, max_iterations + 1):  # noqa: B007
        prior, confusion, counts = m_step(posterior, weights, hot, pseudo_count, symmetric, strata)
        updated = e_step(prior, confusion, hot, strata)
        change = float(np.abs(updated - posterior).max()) if updated.size else 0.0
        posterior = updated
        if change < tolerance:
            converged = True
            break
    prior, confusion, counts = m_step(posterior, weights, hot, pseudo_count, symmetric, strata)
    return DawidSkeneFit(prior, confusion, posterior, counts, iteration, converged)


def bootstrap_fits(
    votes: np.ndarray,
    counts: np.ndarray,
    draws: int,
    seed: int,
    *,
    symmetric: bool,
    pseudo_count: float,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, list[DawidSkeneFit]]:
    """``draws`` bootstrap resamples of the pairs as multinomial pattern weights (draws × P), and the EM
    refitted on each (in batches that bound memory)."""
    rng = np.random.default_rng(seed)
    total = int(counts.sum())
    weights = rng.multinomial(total, counts / total, size=draws).astype(np.float64)
    per_batch = max(1, _CELLS_PER_CHUNK // max(1, votes.shape[0] * votes.shape[1]))
    fits = [
        fit_dawid_skene(
            votes, weights[start : start + per_batch], symmetric=symmetric, strata=strata, pseudo_count=pseudo_count
        )
        for start in range(0, draws, per_batch)
    ]
    return weights, fits


def wrong_label_probability(posterior: np.ndarray, table_class: np.ndarray) -> np.ndarray:
    """(B, P) P(the table's label is wrong) = P(y ≠ the table's class) for each pattern."""
    return np.where(np.asarray(table_class, dtype=bool)[None, :], posterior[:, :, 0], posterior[:, :, 1])


def flip_rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per annotator, from posterior-weighted counts (…, K, 2, 3): (flip rate, flip rate given each class
    (…, K, 2), tie share). The tie rule: a tie is half a flip (it prefers neither response, so it is half
    wrong whichever is better)."""
    wrong_given = np.stack([counts[..., 0, 1], counts[..., 1, 0]], axis=-1) + 0.5 * counts[..., :, 2]
    per_class = counts.sum(axis=-1)
    annotated = per_class.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = wrong_given.sum(axis=-1) / annotated
        given = wrong_given / per_class
        ties = counts[..., :, 2].sum(axis=-1) / annotated
    return rate, given, ties


def position_bias(counts: np.ndarray) -> np.ndarray:
    """P(votes first | second is better) − P(votes second | first is better), strict votes only, per
    annotator (…, K) in the position frame: positive when the annotator favours the first-shown response."""
    strict = counts[..., :, :2].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts[..., 1, 0] / strict[..., 1] - counts[..., 0, 1] / strict[..., 0]


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The 95% percentile interval of bootstrap ``values`` (NaN draws left out; None when none is finite)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None, None
    return float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))

