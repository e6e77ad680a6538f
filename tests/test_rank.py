"""Rank metrics on tables small enough to check by hand, and against scipy on random data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.stats

from prefnoise import metrics
from prefnoise.metrics import builder, rankstats


def pairs(chosen_reward, rejected_reward, chosen_score, rejected_score, prompts=None, **extra):
    n = len(chosen_reward)
    return pl.DataFrame(
        {
            "prompt": prompts or [f"p{i}" for i in range(n)],
            "chosen": [f"c{i}" for i in range(n)],
            "rejected": [f"r{i}" for i in range(n)],
            "pair_id": [f"id{i}" for i in range(n)],
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            "chosen_score": chosen_score,
            "rejected_score": rejected_score,
            **extra,
        }
    )


def test_pair_table_by_hand():
    # pair 0 right, 1 wrong, 2 predicted tie (half), 3 true tie (excluded)
    table = pairs([2.0, 0.0, 1.0, 5.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 3.0, 2.0], [0.0, 0.0, 1.0, 2.0])
    report = metrics.rank_report(table, n_boot=200, worst=1)
    a = report.overall.agreement
    assert a.value == pytest.approx((1 + 0 + 0.5) / 3)
    assert (a.pairs, a.true_ties, a.pred_ties) == (3, 1, 1)
    # each prompt has one pair: preserved only when strictly right; the true-tie prompt is unordered
    p = report.overall.preservation
    assert (p.prompts, p.preserved, p.unordered_prompts, p.value) == (3, 1, 1, pytest.approx(1 / 3))
    assert report.worst[0]["pair_id"] == "id1" and report.worst[0]["signed_margin"] == -1.0


def test_prompt_with_three_responses_by_hand():
    # One prompt, responses a (true 3), b (true 2), c (true 1) in pairs (a,b), (b,c), (a,c) with
    # predicted a=1, b=3, c=0: orders a<b wrong, b>c right, a>c right.
    table = pairs(
        [1.0, 3.0, 1.0], [3.0, 0.0, 0.0], [3.0, 2.0, 3.0], [2.0, 1.0, 1.0], prompts=["q", "q", "q"]
    ).with_columns(chosen=pl.Series(["a", "b", "a"]), rejected=pl.Series(["b", "c", "c"]))
    m = metrics.rank_report(table, n_boot=0).overall
    assert m.agreement.value == pytest.approx(2 / 3)
    assert m.responses == 3  # the pairs reshaped to 3 distinct responses
    # true (3,2,1) vs predicted (1,3,0): concordant 2, discordant 1 -> tau = (2-1)/3
    assert m.kendall_tau_b == pytest.approx(1 / 3)
    assert m.kendall_tau_b_per_prompt == pytest.approx(1 / 3)
    # ranks true (3,2,1), predicted (2,3,1): d = (1,-1,0), rho = 1 - 6*2/(3*8) = 0.5
    assert m.spearman_rho == pytest.approx(0.5)
    assert (m.preservation.prompts, m.preservation.preserved) == (1, 0)


def test_long_table_with_ties_by_hand():
    long = pl.DataFrame(
        {
            "prompt_id": ["a", "a", "a", "b", "b", "c", "c"],
            "reward": [3.0, 2.0, 2.0, 1.0, 2.0, 5.0, 1.0],
            "score": [3.0, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0],
        }
    )
    m = metrics.rank_report(long, n_boot=100).overall
    # a: (3>2 right, 3>1 right, 2 vs 1 predicted tie = 0.5); b: reversed; c: true tie, excluded
    assert m.agreement.value == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert (m.agreement.pairs, m.agreement.true_ties, m.agreement.pred_ties) == (4, 1, 1)
    # preserved: none (a has a predicted tie, b is reversed); c has no strict order
    assert (m.preservation.prompts, m.preservation.preserved, m.preservation.unordered_prompts) == (2, 0, 1)
    # per prompt tau-b: a = (2-0)/sqrt(3*2) ; b = -1 ; c undefined (true all tied)
    assert m.kendall_tau_b_per_prompt == pytest.approx((2 / np.sqrt(6) - 1) / 2)
    assert m.prompts_with_tau == 2


def test_labels_are_the_reference_without_scores():
    table = pairs([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0], [0.0] * 4, [0.0] * 4).drop(
        "chosen_score", "rejected_score"
    )
    report = metrics.rank_report(table, n_boot=50)
    assert report.reference == "labels"
    assert report.overall.agreement.value == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert report.overall.kendall_tau_b is None


def test_perfect_and_reversed_rewards():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(200, 2))
    table = pairs(
        list(s[:, 0] * 2 + 1),
        list(s[:, 1] * 2 + 1),
        list(s[:, 0]),
        list(s[:, 1]),
        prompts=[f"p{i % 50}" for i in range(200)],
    )
    m = metrics.rank_report(table, n_boot=100).overall
    for value in (
        m.agreement.value,
        m.preservation.value,
        m.kendall_tau_b,
        m.spearman_rho,
        m.kendall_tau_b_per_prompt,
        m.spearman_rho_per_prompt,
    ):
        assert value == pytest.approx(1.0)
    reversed_ = table.with_columns(-pl.col("chosen_reward"), -pl.col("rejected_reward"))
    r = metrics.rank_report(reversed_, n_boot=100).overall
    assert r.agreement.value == 0.0 and r.preservation.value == 0.0
    assert r.kendall_tau_b == pytest.approx(-1.0) and r.spearman_rho == pytest.approx(-1.0)


@pytest.mark.parametrize("n, levels", [(50, 5), (3000, 40), (4000, 4000)])
def test_kendall_and_spearman_match_scipy(n, levels):
    rng = np.random.default_rng(n)
    x = rng.integers(0, levels, n).astype(float)
    y = x + rng.integers(0, levels, n)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    assert metrics.spearman_rho(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_grouped_rank_stats_match_scipy_per_group():
    rng = np.random.default_rng(3)
    group = np.sort(rng.integers(0, 150, 2000))  # many groups: the per-segment counting path
    x, y = rng.integers(0, 4, 2000).astype(float), rng.integers(0, 5, 2000).astype(float)
    stats = rankstats.rank_stats((group,), x, y)
    tau = rankstats.tau_b(stats)
    for g in range(0, 150, 7):
        mask = group == g
        expect = scipy.stats.kendalltau(x[mask], y[mask]).statistic
        assert tau[g] == pytest.approx(expect, abs=1e-12, nan_ok=True)


def test_split_by_flipped_and_group_by():
    table = pairs(
        [2.0, 0.0, 3.0, 1.0],
        [1.0, 1.0, 0.0, 2.0],
        [1.0] * 4,
        [0.0] * 4,
        flipped=[False, True, False, True],
        source=["x", "x", "y", "y"],
    )
    report = metrics.rank_report(table, group_by=["source"], n_boot=50)
    assert report.splits["flipped"]["false"].agreement.value == 1.0
    assert report.splits["flipped"]["true"].agreement.value == 0.0
    assert report.splits["source"]["x"].agreement.value == 0.5


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)

    def width(n):
        s = rng.normal(size=(n, 2))
        noisy = s + rng.normal(size=(n, 2))
        a = metrics.pairwise_agreement(
            pairs(list(noisy[:, 0]), list(noisy[:, 1]), list(s[:, 0]), list(s[:, 1])), n_boot=500, seed=0
        )
        assert a.low <= a.value <= a.high
        return a.high - a.low

    small, large = width(200), width(20_000)
    assert large < small / 5  # sqrt(100) = 10 in theory


def test_bootstrap_is_seeded():
    table = pairs([2.0, 0.0, 1.0] * 30, [1.0, 1.0, 1.0] * 30, [1.0] * 90, [0.0] * 90)
    a, b = (metrics.pairwise_agreement(table, n_boot=300, seed=7) for _ in range(2))
    assert (a.low, a.high) == (b.low, b.high)


def test_missing_columns_are_clear_errors():
    from prefnoise.errors import PrefnoiseError

    with pytest.raises(PrefnoiseError, match="chosen_reward"):
        metrics.rank_report(pl.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}))
    with pytest.raises(PrefnoiseError, match="--group-by column 'nope'"):
        metrics.rank_report(pairs([1.0], [0.0], [1.0], [0.0]), group_by=["nope"])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_small_groups_and_numpy_fallback_match_scipy(monkeypatch):
    # > 64 groups of 2 to 8 responses: the neighbour-comparison path; with ties in x and y
    rng = np.random.default_rng(5)
    group = rng.integers(0, 300, 1500)
    x, y = rng.integers(0, 3, 1500).astype(float), rng.integers(0, 4, 1500).astype(float)
    size = np.bincount(group)[group]
    keep = (size >= 2) & (size <= 8)
    group, x, y = group[keep], x[keep], y[keep]
    stats = rankstats.rank_stats((group,), x, y)
    tau, codes = rankstats.tau_b(stats), stats["split"]
    for i in range(0, len(codes), 11):
        mask = group == codes[i]
        expect_tau = scipy.stats.kendalltau(x[mask], y[mask]).statistic
        expect_rho = scipy.stats.spearmanr(x[mask], y[mask]).statistic
        assert tau[i] == pytest.approx(expect_tau, abs=1e-12, nan_ok=True)
        assert stats["rho"][i] == pytest.approx(expect_rho, abs=1e-12, nan_ok=True)
    # without scipy's compiled count, the numpy bit passes give the same tau
    monkeypatch.setattr(rankstats, "_scipy_discordant", None)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)


def random_pairs(rng, n, levels, n_prompts, texts):
    """Pairs with tied rewards, prompts with many pairs and responses that recur within a prompt."""
    tc, tr = (rng.integers(0, levels, n).astype(float) for _ in range(2))
    return pl.DataFrame(
        {
            "prompt": [f"p{p}" for p in rng.integers(0, n_prompts, n)],
            "chosen": [f"t{t}" for t in rng.integers(0, texts, n)],
            "rejected": [f"t{t}" for t in rng.integers(0, texts, n)],
            "pair_id": [f"id{i}" for i in range(n)],
            "chosen_reward": tc + rng.integers(0, levels, n),
            "rejected_reward": tr + rng.integers(0, levels, n),
            "chosen_score": tc,
            "rejected_score": tr,
            "flipped": rng.random(n) < 0.3,
            "source": rng.choice(["a", "b", "c"], n),
        }
    )


class BucketSpy:
    """Records how many buckets each store of a report had."""

    def __init__(self, monkeypatch):
        self.counts = []
        real = builder.Buckets

        def make(dtype, n, temp_dir=None):
            self.counts.append(n)
            return real(dtype, n, temp_dir)

        monkeypatch.setattr(builder, "Buckets", make)


@pytest.mark.parametrize(
    "kind, levels, n_prompts, texts",
    [("pairs", 5, 40, 30), ("pairs", 10_000, 700, 10**6), ("labels", 3, 50, 20), ("long", 4, 60, 0)],
)
def test_partitioned_report_equals_in_memory(kind, levels, n_prompts, texts, tmp_path, monkeypatch):
    # A budget of 37 responses splits ~700 rows into ~20-40 prompt buckets and as many reward ranges;
    # every metric must come out as with the whole table in one bucket (ties, repeated responses, splits).
    rng = np.random.default_rng(levels + n_prompts)
    if kind == "long":
        table = pl.DataFrame(
            {
                "prompt_id": [f"q{p}" for p in rng.integers(0, n_prompts, 700)],
                "reward": rng.integers(0, levels, 700).astype(float) + rng.integers(0, 2, 700),
                "score": rng.integers(0, levels, 700).astype(float),
                "source": rng.choice(["x", "y"], 700),
            }
        )
    else:
        table = random_pairs(rng, 700, levels, n_prompts, texts)
        if kind == "labels":
            table = table.drop("chosen_score", "rejected_score")
    options = {"group_by": ["source"], "n_boot": 200, "seed": 3, "worst": 4}
    whole = metrics.rank_report(table, **options).to_dict()
    spy = BucketSpy(monkeypatch)
    split = metrics.rank_report(table, memory_responses=37, temp_dir=tmp_path, **options).to_dict()
    assert spy.counts[0] >= 19 and (kind == "labels" or min(spy.counts[1:]) >= 5)
    assert _same(split, whole)
    assert list(tmp_path.iterdir()) == []  # the spilled buckets are gone


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-12)
    return a == b


@pytest.mark.parametrize("x_levels, y_levels", [(6, 4), (10**6, 150)])
def test_partitioned_tau_and_rho_match_scipy_over_all_responses(x_levels, y_levels):
    # Few levels: every value has a point bucket of its own (streamed in chunks of 300). Many x
    # levels and ~150 y levels: ties in y inside range buckets whose x values all differ.
    rng = np.random.default_rng(x_levels)
    score = rng.integers(0, x_levels, 5000).astype(float)
    reward = np.floor(score * y_levels / x_levels) + rng.integers(0, 3, 5000)
    long = pl.DataFrame({"prompt_id": rng.integers(0, 900, 5000), "reward": reward, "score": score})
    m = metrics.rank_report(long, n_boot=0, memory_responses=300).overall
    assert m.kendall_tau_b == pytest.approx(scipy.stats.kendalltau(score, reward).statistic, abs=1e-12)
    assert m.spearman_rho == pytest.approx(scipy.stats.spearmanr(score, reward).statistic, abs=1e-12)
    assert m.responses == 5000


def test_progress_adds_up_to_100_and_errors_leave_no_files(tmp_path):
    rng = np.random.default_rng(2)
    table = random_pairs(rng, 300, 50, 30, 10**6)
    steps = []
    metrics.rank_report(table, n_boot=0, memory_responses=50, temp_dir=tmp_path, on_progress=steps.append)
    assert sum(steps) == 100 and all(s > 0 for s in steps)
    nan_only = table.with_columns(chosen_reward=pl.lit(float("nan")))
    from prefnoise.errors import PrefnoiseError

    with pytest.raises(PrefnoiseError, match="no rows"):
        metrics.rank_report(nan_only, memory_responses=50, temp_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_gates_are_objects_and_a_metric_that_cannot_be_computed_fails():
    from prefnoise.metrics.gates import failed_gate_lines, gate_results
    from prefnoise.metrics.results import Agreement, Preservation, RankMetrics

    overall = RankMetrics(rows=4, agreement=Agreement(0.75, None, None, 4, 0, 0),
                          preservation=Preservation(None, 0, 0, 2), kendall_tau_b=0.5)
    gates = gate_results(overall, min_agreement=0.75, min_kendall=0.6, min_preservation=0.1)
    assert gates == [
        {"metric": "agreement", "op": ">=", "threshold": 0.75, "value": 0.75, "passed": True},  # equal passes
        {"metric": "kendall_tau_b", "op": ">=", "threshold": 0.6, "value": 0.5, "passed": False},
        {"metric": "preservation", "op": ">=", "threshold": 0.1, "value": None, "passed": False},
    ]
    assert failed_gate_lines(gates) == ["kendall_tau_b 0.5000 < 0.6", "preservation n/a < 0.1"]
    assert gate_results(overall, None, None, None) == []
