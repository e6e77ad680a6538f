"""Paired comparisons of reward models on the same held-out pairs, with intervals over prompts and seeds.

Every model in a comparison is scored on the same test pairs of the same split and trained on the same
flips, so the per-pair difference of two models' outcomes removes what the pairs share (their difficulty).
An interval resamples in two stages: the seeds (each a split, a set of flips and an initialisation), then
the prompts within each seed (the pairs of one prompt move together: they are not independent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval; ``pairs`` test pairs per seed (their mean), over ``seeds`` seeds."""

    value: float
    low: float
    high: float
    pairs: int
    seeds: int


def cluster_codes(keys: Sequence[object]) -> np.ndarray:
    """Integer cluster codes 0..m-1 for ``keys`` (e.g. prompts), in order of first appearance."""
    _, first, codes = np.unique(np.asarray(keys, dtype=object).astype(str), return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[codes]


def _cluster_sums(values: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(values)
    size = int(clusters.max()) + 1 if len(clusters) else 0
    sums = np.bincount(clusters[keep], weights=values[keep], minlength=size)
    counts = np.bincount(clusters[keep], minlength=size).astype(np.float64)
    return sums, counts


def two_stage_mean(
    values: Sequence[np.ndarray],
    clusters: Sequence[np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Mean over seeds of each seed's mean of ``values`` (NaN left out), with a percentile interval from a
    two-stage bootstrap: seeds with replacement (when there are several), then each seed's clusters.

    ``values[s]`` and ``clusters[s]`` (integer codes, see :func:`cluster_codes`) belong to seed ``s``.
    With ``n_boot`` 0 the interval is (NaN, NaN).
    """
    pairs_of = zip(values, clusters, strict=True)
    stats = [_cluster_sums(np.asarray(v, dtype=np.float64), np.asarray(c)) for v, c in pairs_of]
    means = [s.sum() / n.sum() if n.sum() else np.nan for s, n in stats]
    value = float(np.nanmean(means)) if not np.all(np.isnan(means)) else float("nan")
    pairs = int(round(np.mean([n.sum() for _, n in stats]))) if stats else 0
    if n_boot == 0 or np.isnan(value):
        return Estimate(value, float("nan"), float("nan"), pairs, len(stats))
    rng = np.random.default_rng(seed)
    per_seed = np.empty((len(stats), n_boot))
    for index, (sums, counts) in enumerate(stats):
        weights = rng.multinomial(len(sums), np.full(len(sums), 1.0 / len(sums)), size=n_boot).astype(np.float64)
        total = weights @ counts
        per_seed[index] = np.where(total > 0, (weights @ sums) / np.where(total > 0, total, 1.0), np.nan)
    chosen = rng.integers(0, len(stats), size=(n_boot, len(stats))) if len(stats) > 1 else np.zeros((n_boot, 1), int)
    replicates = np.nanmean(per_seed[chosen, np.arange(n_boot)[:, None]], axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(replicates, [tail, 1.0 - tail])
    return Estimate(value, float(low), float(high), pairs, len(stats))


def verdict(loss: str, reference: str, difference: Estimate) -> str:
    """One sentence for a paired difference: who is ahead and by how much, or that the data cannot tell."""
    if np.isnan(difference.low) or difference.low <= 0 <= difference.high:
        return (f"{loss} and {reference} cannot be told apart at this size "
                f"({difference.pairs} test pairs, {difference.seeds} seed{'s' if difference.seeds != 1 else ''})")
    if difference.low > 0:
        return f"{loss} ahead of {reference} by {difference.value:.2f} [{difference.low:.2f}, {difference.high:.2f}]"
    return f"{loss} behind {reference} by {-difference.value:.2f} [{-difference.high:.2f}, {-difference.low:.2f}]"
