"""rank-check's agreement interval resamples prompts (clusters) in both layouts."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.metrics import rank_report

runner = CliRunner()
PROMPTS, PER_PROMPT, RIGHT = 20, 50, 14  # 14 of 20 prompts ranked entirely right, 6 entirely wrong


def clustered_pairs(labels_only: bool = False) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    n = PROMPTS * PER_PROMPT
    prompt = np.repeat(np.arange(PROMPTS), PER_PROMPT)
    sign = np.where(prompt < RIGHT, 1.0, -1.0)
    true_c, true_r = rng.random(n) + 2.0, -rng.random(n) - 2.0  # chosen always truly better
    frame = pl.DataFrame(
        {
            "prompt": [f"prompt {p}" for p in prompt],
            "chosen": [f"c{i}" for i in range(n)],
            "rejected": [f"r{i}" for i in range(n)],
            "chosen_score": true_c,
            "rejected_score": true_r,
            "chosen_reward": sign * true_c,
            "rejected_reward": sign * true_r,
        }
    )
    return frame.drop("chosen_score", "rejected_score") if labels_only else frame


def clustered_long() -> pl.DataFrame:
    k = 11  # 55 pairs per prompt
    prompt = np.repeat(np.arange(PROMPTS), k)
    true = np.tile(np.arange(k, dtype=float), PROMPTS)
    return pl.DataFrame({"prompt_id": prompt, "score": true, "reward": np.where(prompt < RIGHT, 1.0, -1.0) * true})


def _check(report, pairs):
    a = report.overall.agreement
    assert a.value == pytest.approx(RIGHT / PROMPTS)
    assert a.pairs == pairs
    # A binomial over 20 prompts: 0.7 ± 1.96·sqrt(0.21/20) ≈ ± 0.2; a bootstrap over the pairs
    # would give about ± 0.03.
    assert 0.3 <= a.high - a.low <= 0.55
    assert a.low < 0.55 and a.high > 0.85
    assert report.interval == f"cluster bootstrap over {PROMPTS} prompts"


@pytest.mark.parametrize("labels_only", [False, True])
def test_pair_table_interval_resamples_prompts(labels_only):
    report = rank_report(clustered_pairs(labels_only), n_boot=2000, seed=1)
    assert report.reference == ("labels" if labels_only else "score")
    _check(report, PROMPTS * PER_PROMPT)


def test_long_table_interval_resamples_prompts():
    _check(rank_report(clustered_long(), n_boot=2000, seed=1), PROMPTS * 55)


def test_split_intervals_and_ties_per_split():
    frame = clustered_pairs().with_columns(
        flipped=pl.Series(np.arange(PROMPTS * PER_PROMPT) % 2 == 0),
        rejected_score=pl.when(pl.int_range(pl.len()) < 10).then(pl.col("chosen_score")).otherwise("rejected_score"),
    )
    report = rank_report(frame, n_boot=500, seed=1)
    assert report.overall.agreement.true_ties == 10
    assert report.overall.agreement.pairs == PROMPTS * PER_PROMPT - 10
    per_split = report.splits["flipped"]
    assert {k: v.agreement.true_ties for k, v in per_split.items()} == {"false": 5, "true": 5}
    for metrics in per_split.values():
        assert metrics.agreement.high - metrics.agreement.low > 0.25


def test_cli_json_names_the_interval(tmp_path):
    path = tmp_path / "d.parquet"
    clustered_pairs().write_parquet(path)
    result = runner.invoke(app, ["rank-check", str(path), "--json", "--bootstrap", "500"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["interval"] == "cluster bootstrap over 20 prompts"


def test_pairwise_agreement_resamples_prompts_too():
    from prefnoise.metrics import pairwise_agreement

    a = pairwise_agreement(clustered_pairs(), n_boot=2000, seed=1)
    assert a.value == pytest.approx(0.7) and 0.3 <= a.high - a.low <= 0.55
    b = pairwise_agreement(clustered_pairs().drop("prompt"), n_boot=2000, seed=1)  # no prompts: pairs
    assert b.value == pytest.approx(0.7) and b.high - b.low < 0.1


def test_one_tie_rule_for_accuracy():
    from prefnoise.metrics import pairwise_agreement, tie_half_accuracy

    margin = [1.0, 0.0, -2.0, 3.0]
    assert tie_half_accuracy(margin) == pytest.approx(2.5 / 4)  # tie counts half
    assert tie_half_accuracy(margin, [1, 1, -1, 0]) == pytest.approx(2.5 / 3)  # truth tie left out
    assert np.isnan(tie_half_accuracy([], None))
    table = pl.DataFrame({"chosen_reward": [1.0, 0.0, -2.0], "rejected_reward": [0.0, 0.0, 0.0]})
    assert pairwise_agreement(table, n_boot=0).value == tie_half_accuracy([1.0, 0.0, -2.0])
