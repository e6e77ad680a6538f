"""Per-prompt Spearman against polars' native grouped rank correlation (issue 15's anchor), and the
group coding of ``rank_stats`` (each key coded on its own, no float mixing of the keys)."""

from __future__ import annotations

import numpy as np
import polars as pl

from prefnoise.metrics.rankstats import group_codes, rank_stats


def test_group_codes_by_hand():
    split = np.array([1, 0, 1, 0, 1])
    prompt = np.array([7, 7, 3, 7, 7])
    code, first = group_codes((split, prompt))
    # groups in key order: (0, 7), (1, 3), (1, 7)
    assert code.tolist() == [2, 0, 1, 0, 2]
    assert first.tolist() == [0, 1, 1]
    code, first = group_codes((prompt,))
    assert code.tolist() == [1, 1, 0, 1, 1] and first.tolist() == [3, 7]


def test_group_codes_keep_uint64_hashes_apart():
    # two prompt hashes that are the same number once cast to float64 (as np.stack with int64 did)
    a, b = np.uint64(2**63 + 1), np.uint64(2**63 + 2)
    assert float(a) == float(b)
    code, _ = group_codes((np.zeros(4, dtype=np.int64), np.array([a, a, b, b], dtype=np.uint64)))
    assert code.tolist() == [0, 0, 1, 1]


def test_per_prompt_spearman_matches_polars():
    rng = np.random.default_rng(0)
    n = 4000
    prompt = rng.integers(0, 600, n)
    x = np.round(rng.normal(size=n), 1)  # ties in x
    y = x + rng.normal(size=n)
    y[::7] = 0.0  # ties in y
    frame = pl.DataFrame({"prompt": prompt, "x": x, "y": y})
    native = frame.group_by("prompt").agg(pl.corr("x", "y", method="spearman").alias("rho")).sort("prompt")
    ours = rank_stats((np.zeros(n, dtype=np.int64), prompt), x, y)
    rho = native["rho"].to_numpy()
    assert np.array_equal(np.isnan(ours["rho"]), np.isnan(rho))
    np.testing.assert_allclose(ours["rho"], rho, atol=1e-12, equal_nan=True)
    assert ours["n"].sum() == n and np.isnan(rho).sum() > 0  # single-response prompts have no rho
