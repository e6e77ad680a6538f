"""Noise models: determinism, realized rates within binomial bounds, exact counts, swaps."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from prefnoise.data import canonicalize
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import (
    NoiseSpec,
    bradley_terry_flip_probability,
    corrupt_batches,
    corrupt_frame,
    exact_thresholds,
    swap_responses,
    uniform_draws,
    wilson_interval,
)
from tests.conftest import make_pairs


def canonical(n: int, seed: int = 0) -> pl.DataFrame:
    return canonicalize(make_pairs(n, seed))[0]


@pytest.fixture(scope="module")
def big() -> pl.DataFrame:
    return canonical(100_000, seed=1)


def within_binomial(flips: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(flips - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_uniform_draws_are_pure_functions_of_seed_and_id():
    ids = ["a", "b", "c", "d"]
    first = uniform_draws(ids, seed=3)
    assert np.array_equal(uniform_draws(ids[::-1], seed=3), first[::-1])
    assert not np.array_equal(uniform_draws(ids, seed=4), first)
    assert not np.array_equal(uniform_draws(ids, seed=3, stream="other"), first)
    assert ((first >= 0) & (first < 1)).all()


def test_uniform_draws_are_uniform(big):
    u = uniform_draws(big["pair_id"], seed=0)
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    expected = len(u) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 degrees of freedom: P(chi2 > 30) < 0.001


def test_flips_do_not_depend_on_batch_size_or_row_order(big):
    spec = NoiseSpec(kind="symmetric", rate=0.3, seed=11)
    whole = next(corrupt_batches([big], spec))
    shuffled = big.sample(fraction=1.0, shuffle=True, seed=5)
    pieces = pl.concat(list(corrupt_batches(shuffled.iter_slices(977), spec)))
    assert whole.sort("pair_id").equals(pieces.sort("pair_id"))


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_symmetric_rate_within_binomial_bound(big, rate):
    out, stats = corrupt_frame(big, NoiseSpec(kind="symmetric", rate=rate, seed=2))
    assert within_binomial(stats.flips, 100_000, rate)
    assert int(out["flipped"].sum()) == stats.flips
    low, high = stats.groups["all"].interval()
    assert low < stats.flips / 100_000 < high


def test_flip_swaps_every_response_column(pairs):
    table = canonicalize(pairs)[0]
    mask = np.zeros(table.height, bool)
    mask[[0, 3]] = True
    out = swap_responses(table, mask)
    assert out["chosen"][0] == table["rejected"][0] and out["rejected"][0] == table["chosen"][0]
    assert out["chosen_score"][3] == table["rejected_score"][3]
    assert out["chosen"][1] == table["chosen"][1]
    assert out["flipped"].to_list() == mask.tolist()
    # a second flip of the same row restores it: flipped is an XOR audit trail
    back = swap_responses(out, mask)
    assert back.drop("flipped").equals(table) and not back["flipped"].any()


def test_asymmetric_rates_per_group(big):
    spec = NoiseSpec(kind="asymmetric", rate_pos=0.3, rate_neg=0.1, by="longer", seed=4)
    _, stats = corrupt_frame(big, spec)
    longer = int((big["chosen"].str.len_chars() > big["rejected"].str.len_chars()).sum())
    pos, neg = stats.groups["positive"], stats.groups["negative"]
    assert pos.rows == longer and neg.rows == 100_000 - longer
    assert within_binomial(pos.flips, pos.rows, 0.3) and within_binomial(neg.flips, neg.rows, 0.1)


def test_asymmetric_by_column_and_compare():
    table = canonical(2000).with_columns(flag=pl.int_range(pl.len()) % 4 == 0)
    _, stats = corrupt_frame(
        table, NoiseSpec(kind="asymmetric", rate_pos=1.0, rate_neg=0.0, by="column:flag", force=True)
    )
    assert stats.groups["positive"].flips == 500 and stats.groups["negative"].flips == 0
    _, stats = corrupt_frame(
        table, NoiseSpec(kind="asymmetric", rate_pos=0.0, rate_neg=1.0, by="compare:score", force=True)
    )
    assert stats.groups["positive"].rows == 2000 and stats.flips == 0  # chosen always scores higher


def test_exact_flips_exact_counts(big):
    out, stats = corrupt_frame(big, NoiseSpec(kind="symmetric", rate=0.2, exact=True, seed=9))
    assert stats.flips == 20_000 and int(out["flipped"].sum()) == 20_000
    spec = NoiseSpec(kind="asymmetric", rate_pos=0.25, rate_neg=0.05, exact=True, seed=9)
    _, stats = corrupt_frame(big, spec)
    for group, rate in (("positive", 0.25), ("negative", 0.05)):
        assert stats.groups[group].flips == round(rate * stats.groups[group].rows)
    # exact thresholds do not depend on how the rows are batched
    assert exact_thresholds(big.iter_slices(1000), spec) == exact_thresholds([big], spec)


def test_bradley_terry_probability_by_hand():
    p = bradley_terry_flip_probability(np.array([1.0, 0.0, 3.0]), np.array([0.0, 0.0, 1.0]), 1.0)
    assert p == pytest.approx([0.2689414214, 0.5, 0.1192029220])
    assert bradley_terry_flip_probability(np.array([1e4]), np.array([-1e4]), 0.5)[0] == 0.0


def test_bt_flip_frequency_follows_sigmoid():
    n = 60_000
    table = canonical(n, seed=3)
    margin = np.repeat([0.0, 1.0, 3.0], n // 3)
    table = table.with_columns(chosen_score=pl.Series(margin), rejected_score=pl.lit(0.0))
    out, _ = corrupt_frame(table, NoiseSpec(kind="bt", temperature=1.0, seed=1))
    flipped = out["flipped"].to_numpy()
    for k, m in enumerate((0.0, 1.0, 3.0)):
        rows = flipped[k * (n // 3) : (k + 1) * (n // 3)]
        assert within_binomial(int(rows.sum()), len(rows), 1 / (1 + math.exp(m)))


def test_uniform_instance_noise_averages_half_max(big):
    _, stats = corrupt_frame(big, NoiseSpec(kind="uniform", max_rate=0.3, seed=1))
    assert abs(stats.flips / 100_000 - 0.15) < 0.006
    assert stats.groups["all"].expected_flips / 100_000 == pytest.approx(0.15, abs=0.003)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (NoiseSpec(kind="symmetric", rate=1.5), r"--rate must be within \[0, 1\]"),
        (NoiseSpec(kind="symmetric", rate=0.5), "carry no signal.*--force"),
        (NoiseSpec(kind="symmetric"), "--rate is required"),
        (NoiseSpec(kind="asymmetric", rate_pos=0.6, rate_neg=0.5), "--force"),
        (NoiseSpec(kind="asymmetric", rate_pos=0.1, rate_neg=0.1, by="shorter"), "unknown --by rule"),
        (NoiseSpec(kind="bt", temperature=0), "--temperature must be > 0"),
        (NoiseSpec(kind="bt", exact=True), "--exact applies to symmetric and asymmetric"),
        (NoiseSpec(kind="gaussian"), "unknown noise model"),
    ],
)
def test_bad_parameters(spec, message):
    with pytest.raises(PrefnoiseError, match=message):
        spec.check()


def test_missing_columns_for_bt_and_rules():
    schema = canonicalize(make_pairs(3, scores=False))[0].schema
    with pytest.raises(PrefnoiseError, match="--noise bt needs true scores in chosen_score and rejected_score"):
        NoiseSpec(kind="bt").check(schema)
    with pytest.raises(PrefnoiseError, match="no column 'flag'"):
        NoiseSpec(kind="asymmetric", rate_pos=0.1, rate_neg=0.1, by="column:flag").check(schema)


def test_wilson_interval_by_hand():
    low, high = wilson_interval(20, 100)
    assert low == pytest.approx(0.1333, abs=1e-4) and high == pytest.approx(0.2888, abs=1e-4)


def test_uniform_draws_ignore_batch_padding_and_are_pinned():
    ids = pl.Series(["a", "bb", "ccccccccc", "", "é" * 10, "x" * 100])
    whole = uniform_draws(ids, seed=1)
    pieces = np.concatenate([uniform_draws(ids[:2], seed=1), uniform_draws(ids[2:], seed=1)])
    assert np.array_equal(whole, pieces)  # padding to the longest id in a batch changes nothing
    assert len(set(whole.tolist())) == 6
    # pinned values: a change here re-flips every user's dataset, so it must be deliberate
    assert uniform_draws(["a", "pair-0001", "x" * 20], seed=0).tolist() == [
        0.5975750464318914,
        0.6790046738430148,
        0.8316989003430607,
    ]


def test_null_pair_ids_are_an_error():
    with pytest.raises(PrefnoiseError, match="pair_id has null values"):
        uniform_draws(pl.Series(["a", None]), seed=0)


def test_judge_flip_probability_by_hand():
    from prefnoise.noise import judge_flip_probability

    # σ(−|Δ|/T): 1/2 on a tie, σ(−2) = 0.1192 at |Δ| = 1, T = 0.5; +0.3 where the better response is shorter
    p = judge_flip_probability(np.array([0.0, 1.0, -1.0, 5.0]), 0.5, np.array([False, False, True, True]), 0.3)
    assert p == pytest.approx([0.5, 0.119203, 0.419203, 0.3 + 1 / (1 + np.exp(10))], abs=1e-6)
    assert judge_flip_probability(np.array([0.0]), 1.0, np.array([True]), 0.8)[0] == 1.0  # capped
