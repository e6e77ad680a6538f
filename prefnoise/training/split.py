"""Stable train/validation splits and K-fold assignments keyed by pair_id.

Both come from the same keyed hash of (seed, pair_id), so a pair keeps its side of the split when
rows are added, removed, reordered or flipped, and fold 0 of ``k`` folds is the validation split
of fraction ``1/k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from prefnoise.columns import DEFAULT_SEED
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import uniform_draws

SPLIT_STREAM = "split"


def split_by_pair_id(pair_ids: Sequence[str] | pl.Series, fraction: float, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Boolean mask, True for the pairs in the held-out (validation) part of size ≈ ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise PrefnoiseError(f"--val-fraction must be in [0, 1), got {fraction}")
    return uniform_draws(pair_ids, seed, stream=SPLIT_STREAM) < fraction


def fold_of_pair_id(pair_ids: Sequence[str] | pl.Series, k: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Fold index in [0, k) of each pair, ≈ equal-sized folds, stable under row changes."""
    if k < 2:
        raise PrefnoiseError(f"the number of folds must be >= 2, got {k}")
    folds = np.floor(uniform_draws(pair_ids, seed, stream=SPLIT_STREAM) * k).astype(np.int64)
    return np.minimum(folds, k - 1)
