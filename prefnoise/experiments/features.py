"""A generated feature task with a known true reward: the paper's "actions are vectors" setting."""

from __future__ import annotations

import numpy as np
import polars as pl

from prefnoise import columns as C

ORIENTATION = "first_is_chosen"  # a random per-pair orientation: the class asymmetric noise conditions on


def linear_feature_pairs(n: int, dim: int = 16, *, seed: int = 0, weight_seed: int = 12345) -> pl.DataFrame:
    """``n`` pairs of N(0, I) vectors; true reward w·x (w fixed by ``weight_seed``); chosen = higher reward."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(weight_seed).normal(size=dim)
    a, b = rng.normal(size=(2, n, dim)).astype(np.float32)
    score_a, score_b = a @ w, b @ w
    first = score_a >= score_b
    return pl.DataFrame(
        {
            C.PROMPT: [f"p{i}" for i in range(n)],
            C.CHOSEN: [f"c{i}" for i in range(n)],
            C.REJECTED: [f"r{i}" for i in range(n)],
            C.chosen(C.SCORE): np.maximum(score_a, score_b).astype(np.float64),
            C.rejected(C.SCORE): np.minimum(score_a, score_b).astype(np.float64),
            C.chosen(C.FEATURES): np.where(first[:, None], a, b),
            C.rejected(C.FEATURES): np.where(first[:, None], b, a),
            ORIENTATION: rng.random(n) < 0.5,
        }
    ).with_columns(pl.col(C.chosen(C.FEATURES), C.rejected(C.FEATURES)).cast(pl.Array(pl.Float32, dim)))
