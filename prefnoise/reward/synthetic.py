"""Synthetic feature pairs with a known true reward (the paper's vector-action setting).

Each pair holds two random vectors in R^d; the true reward is a random linear map or a random
one-hidden-layer tanh network; the label follows the true order, so every pair starts clean
(``chosen_score > rejected_score``). ``first_better`` is a fair coin per pair: the orientation
that asymmetric noise (``--by column:first_better``) conditions on, as in the paper's setup.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.data import content_pair_ids
from prefnoise.errors import PrefnoiseError

TRUE_REWARDS = ("linear", "mlp")


def true_reward_fn(dim: int, kind: str, rng: np.random.Generator):
    """A random true reward R^dim -> R of ``kind`` (linear or a small tanh MLP)."""
    if kind == "linear":
        w = rng.standard_normal(dim)
        return lambda x: x @ w
    if kind == "mlp":
        w1 = rng.standard_normal((dim, 32)) / np.sqrt(dim)
        w2 = rng.standard_normal(32)
        return lambda x: np.tanh(x @ w1) @ w2
    raise PrefnoiseError(f"unknown true reward {kind!r}; choose one of {', '.join(TRUE_REWARDS)}")


def feature_pairs(n: int, *, dim: int = 16, seed: int = 0, true_reward: str = "linear") -> pl.DataFrame:
    """A clean canonical table of ``n`` feature pairs with true scores (chosen is truly better)."""
    rng = np.random.default_rng(seed)
    reward = true_reward_fn(dim, true_reward, rng)
    a = rng.standard_normal((n, dim)).astype(np.float32)
    b = rng.standard_normal((n, dim)).astype(np.float32)
    ra, rb = reward(a.astype(np.float64)), reward(b.astype(np.float64))
    a_better = (ra >= rb)[:, None]
    chosen, rejected = np.where(a_better, a, b), np.where(a_better, b, a)
    prompts = ["pick the better vector"] * n
    chosen_text = [f"s{seed}-{i}-a" if ok else f"s{seed}-{i}-b" for i, ok in enumerate(a_better[:, 0])]
    rejected_text = [f"s{seed}-{i}-b" if ok else f"s{seed}-{i}-a" for i, ok in enumerate(a_better[:, 0])]
    vector = pl.Array(pl.Float32, dim)
    return pl.DataFrame(
        {
            C.PROMPT: prompts,
            C.CHOSEN: chosen_text,
            C.REJECTED: rejected_text,
            C.PAIR_ID: content_pair_ids(prompts, chosen_text, rejected_text),
            C.chosen(C.FEATURES): pl.Series(chosen, dtype=vector),
            C.rejected(C.FEATURES): pl.Series(rejected, dtype=vector),
            C.chosen(C.SCORE): np.maximum(ra, rb),
            C.rejected(C.SCORE): np.minimum(ra, rb),
            "first_better": rng.random(n) < 0.5,
        }
    )
