"""The flip rate from a small gold set plus the fold models' scores (prediction-powered inference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.data import read_history
from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit import gold as G

runner = CliRunner()

# ---- the formulas, by hand -------------------------------------------------------------------------


def test_ppi_mean_by_hand():
    unlabelled = np.array([0.2, 0.4, 0.6, 0.8])
    scored, truth = np.array([0.1, 0.9, 0.2, 0.8]), np.array([0.0, 1.0, 0.0, 1.0])
    estimate, half, weight = G.ppi_mean(unlabelled, scored, truth)
    # var of all eight scores = 0.70/7 = 0.1; cov(w, f) on the gold = 0.7/3; λ = (0.7/3)/((1 + 4/4)·0.1) = 7/6
    assert weight == pytest.approx(7 / 6)
    # θ̂ = λ·0.5 + mean(w − λf) = 7/12 + (0.5 − 7/12) = 0.5
    assert estimate == pytest.approx(0.5)
    # w − λf = [−0.11667, −0.05, −0.23333, 0.06667]: var = 0.047222/3; var of the unlabelled scores = 0.2/3
    variance = (7 / 6) ** 2 * (0.2 / 3) / 4 + (0.047222222 / 3) / 4
    assert half == pytest.approx(1.959964 * math.sqrt(variance), rel=1e-5)  # 0.31978
    assert half == pytest.approx(0.31978, abs=1e-4)


def test_ppi_mean_with_an_uninformative_score_is_the_gold_mean():
    # a constant score: no spread, λ = 0, so θ̂ is the gold mean with the gold-only normal interval
    estimate, half, weight = G.ppi_mean(np.full(5, 0.3), np.full(4, 0.3), np.array([0.0, 1.0, 1.0, 1.0]))
    assert weight == 0.0 and estimate == pytest.approx(0.75)
    assert half == pytest.approx(1.959964 * math.sqrt(0.25 / 4))  # var(0,1,1,1) = 0.25 (ddof 1)


def test_exact_interval_by_hand():
    # Clopper–Pearson with no successes in 10: [0, 1 − 0.025^(1/10)]; all 10: [0.025^(1/10), 1]
    assert G.exact_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert G.exact_interval(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    low, high = G.exact_interval(15, 100)
    assert (round(low, 4), round(high, 4)) == (0.0865, 0.2353)


def test_label_wrong_score_is_a_scaled_logistic():
    score = G.label_wrong_score(np.array([-2.0, 0.0, 1.0, 2.0]))  # median |m| = 1.5
    assert score == pytest.approx(1 / (1 + np.exp(np.array([-2.0, 0.0, 1.0, 2.0]) / 1.5)))


# ---- gold votes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ["chosen", "rejected", "tie", None, "Rejected"],
        [1, -1, 0, None, -1],
        [1.0, -1.0, 0.0, None, -1.0],
    ],
)
def test_gold_votes_in_every_encoding(values):
    wrong = G.gold_wrong(pl.Series("g", values), "g")
    assert wrong[:3].tolist() == [0.0, 1.0, 0.5] and math.isnan(wrong[3]) and wrong[4] == 1.0


def test_gold_votes_as_booleans():
    wrong = G.gold_wrong(pl.Series("g", [True, False, None]), "g")
    assert wrong[:2].tolist() == [0.0, 1.0] and math.isnan(wrong[2])


def test_bad_gold_votes_name_the_column_and_row():
    with pytest.raises(PrefnoiseError, match=r"--gold: column 'g', row 3: vote 'maybe' is not an accepted vote"):
        G.gold_wrong(pl.Series("g", ["chosen", None, "maybe"]), "g")
    with pytest.raises(PrefnoiseError, match=r"--gold: column 'g', row 2: vote 2 is not an accepted vote"):
        G.gold_wrong(pl.Series("g", [1, 2]), "g")
    with pytest.raises(PrefnoiseError, match="--gold: column 'g' has no gold vote for chosen or rejected"):
        G.gold_wrong(pl.Series("g", [None, "tie"]), "g")
    with pytest.raises(PrefnoiseError, match="column 'h' not found"):
        G.gold_estimate_of(pl.DataFrame({"g": ["chosen"], "oof_margin": [1.0]}), "h")


# ---- the estimate ----------------------------------------------------------------------------------


def dataset(seed: int, rate: float, strength: float, pairs: int = 2000, gold: int = 100):
    """Pairs whose labels are wrong with ``rate``; margins that separate wrong from right labels by
    ``strength`` (0: an uninformative model); ``gold`` random pairs with the truth. Returns
    (score, gold column, realized rate)."""
    rng = np.random.default_rng(seed)
    wrong = (rng.random(pairs) < rate).astype(float)
    margins = np.where(wrong == 1, -strength, strength) + rng.normal(0, 1, pairs)
    column = np.full(pairs, np.nan)
    chosen = rng.choice(pairs, gold, replace=False)
    column[chosen] = wrong[chosen]
    return G.label_wrong_score(margins), column, float(wrong.mean())


def test_gold_estimate_counts_ties_and_keeps_the_gold_only_interval():
    score, column, _ = dataset(0, 0.15, 2.0)
    column[np.flatnonzero(~np.isnan(column))[:5]] = 0.5  # five gold ties: left out
    estimate = G.gold_noise_rate(score, column)
    assert estimate.gold_pairs == 95 and estimate.gold_ties == 5 and estimate.pairs == 2000
    successes = round(estimate.gold_rate * 95)
    assert (estimate.gold_low, estimate.gold_high) == pytest.approx(G.exact_interval(successes, 95))
    assert estimate.method == "gold" and estimate.model_weight > 0
    assert estimate.to_dict()["rate"] == estimate.rate


def test_few_wrong_gold_labels_fall_back_to_the_exact_interval():
    score, column, _ = dataset(1, 0.03, 2.0)  # about 3 wrong labels among 100 gold pairs
    estimate = G.gold_noise_rate(score, column)
    assert estimate.model_weight == 0.0 and "fewer than 10 wrong or right" in estimate.interval
    assert (estimate.low, estimate.high) == (estimate.gold_low, estimate.gold_high)


def test_too_few_gold_pairs_are_undetermined():
    score, column, _ = dataset(2, 0.2, 2.0, gold=8)
    estimate = G.gold_noise_rate(score, column)
    assert not estimate.identifiable and "only 8 gold pairs" in estimate.reason and math.isnan(estimate.rate)


@pytest.mark.parametrize(("strength", "least", "most"), [(2.0, 0.3, 0.7), (0.0, 0.9, 1.0)])
def test_coverage_over_200_simulated_datasets(strength, least, most):
    """At least 93% of 200 datasets covered at the 95% level (the realized rate of the table). An informative
    model makes the interval at most 0.7 of the gold-only width on average; an uninformative one leaves it at
    the gold-only width or a little under it (the normal interval where it is narrower than the exact one)."""
    covered, ratios = 0, []
    for seed in range(200):
        score, column, truth = dataset(seed, 0.15, strength)
        estimate = G.gold_noise_rate(score, column)
        covered += estimate.low <= truth <= estimate.high
        ratios.append((estimate.high - estimate.low) / (estimate.gold_high - estimate.gold_low))
    assert covered >= 186, covered
    assert least <= np.mean(ratios) <= most and max(ratios) <= 1.0


# ---- the CLI and the PandaLM dev slice ---------------------------------------------------------------

PANDALM = Path("/work/shared/data/real/pandalm-dev.jsonl.gz")
CACHE = Path(__file__).parents[1] / "bench" / "data" / "pandalm-dev-oof.csv"
needs_pandalm = pytest.mark.skipif(not PANDALM.exists(), reason="the shared PandaLM dev slice is not here")


def pandalm_table(tmp_path: Path, seed: int = 0) -> tuple[Path, float]:
    """The judge-labelled PandaLM dev pairs with 100 gold pairs (seed) and the cached out-of-fold margins
    (embed+mlp on MiniLM, mean of 3 refits; bench/audit_gold.py) as column ``m``; and the judge's true rate."""
    from bench.audit_gold import pandalm_pairs

    frame = pandalm_pairs(PANDALM, gold=100, seed=seed)
    cached = pl.read_csv(CACHE).select("idx", pl.mean_horizontal(pl.exclude("idx")).alias("m"))
    path = tmp_path / "pandalm.parquet"
    frame.join(cached, on="idx").write_parquet(path)
    return path, float(frame["label_wrong"].mean())


@needs_pandalm
def test_pandalm_gold_mode_end_to_end(tmp_path):
    """100 gold pairs (the 2-of-3 human majority) + the fold models' margins: the interval covers the judge's
    rate on the slice (49/315 = 0.156) and is narrower than the gold-only interval."""
    path, truth = pandalm_table(tmp_path)
    assert truth == pytest.approx(49 / 315)
    out = tmp_path / "audited.parquet"
    args = ["audit", str(path), "--margin-col", "m", "--gold", "gold"]
    result = runner.invoke(app, [*args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rate = report["noise_rate"]
    assert report["method"] == "gold" and rate["method"] == "gold" and rate["gold_pairs"] == 100
    assert rate["low"] <= truth <= rate["high"] and rate["gold_low"] <= truth <= rate["gold_high"]
    assert rate["high"] - rate["low"] < rate["gold_high"] - rate["gold_low"] and rate["model_weight"] > 0
    assert report["model_only"]["pairs"] == 315  # the single-label verdict, beside it
    schema = json.loads((Path(__file__).parents[1] / "docs" / "schemas" / "audit.json").read_text(encoding="utf-8"))
    jsonschema.validate(report, schema)  # the --json contract holds in gold mode
    history = read_history(out)[-1]
    assert history["noise_estimate"]["method"] == "gold" and history["parameters"]["gold"] == "gold"
    text = runner.invoke(app, args)
    assert "gold pairs alone: 0.190 (exact 95% interval 0.118–0.281)" in text.output


@needs_pandalm
def test_pandalm_judge_alone_is_covered_or_declined(tmp_path):
    """The judge alone: close pairs disagree about twice as often as confident ones, so the interval reaches up
    to the models' disagreement (or the rate is declined); either way no interval that misses 0.156."""
    path, truth = pandalm_table(tmp_path)
    result = runner.invoke(app, ["audit", str(path), "--margin-col", "m", "--json"])
    rate = json.loads(result.stdout)["noise_rate"]
    assert rate["difficulty"]["ratio"] > 1.5 and rate["difficulty"]["p_value"] < 0.05
    if rate["rate"] is None:
        assert "close pairs disagree" in rate["reason"] and rate["at_least"] <= truth <= rate["at_most"]
    else:
        assert rate["low"] <= truth <= rate["high"] == rate["at_most"] and rate["close_pairs_note"]


def test_gold_bad_input_exits_2_and_writes_nothing(tmp_path):
    table = pl.DataFrame({
        "prompt": ["p"] * 4, "chosen": ["a", "b", "c", "d"], "rejected": ["w", "x", "y", "z"],
        "m": [1.0, -1.0, 2.0, 0.5], "g": ["chosen", None, "maybe", None], "empty": [None, None, None, "tie"],
    })
    path = tmp_path / "t.parquet"
    table.write_parquet(path)
    out = tmp_path / "o.parquet"
    for gold, message in [
        ("g", "--gold: column 'g', row 3: vote 'maybe' is not an accepted vote"),
        ("empty", "--gold: column 'empty' has no gold vote for chosen or rejected"),
        ("nope", "--gold: column 'nope' not found"),
    ]:
        result = runner.invoke(app, ["audit", str(path), "--margin-col", "m", "--gold", gold, "--out", str(out)])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
        assert not out.exists()
    both = runner.invoke(app, ["audit", str(path), "--annotators", "g", "--gold", "g"])
    assert both.exit_code == 2 and "--gold" in both.stderr


def test_gold_fix_swaps_known_wrong_gold_pairs_and_turns_the_gold_column(tmp_path):
    """--fix swap in gold mode: suspicion on a gold pair is its gold vote, and swapped pairs' gold votes turn."""
    score_rng = np.random.default_rng(3)
    pairs = 400
    wrong = score_rng.random(pairs) < 0.2
    margins = np.where(wrong, -1.5, 1.5) + score_rng.normal(0, 1, pairs)
    gold = np.where(wrong, "rejected", "chosen").astype(object)
    gold[100:] = None
    gold[0], margins[0] = "rejected", 3.0  # a confident margin the gold vote overrules
    table = pl.DataFrame({
        "prompt": ["p"] * pairs, "chosen": [f"c{i}" for i in range(pairs)], "rejected": [f"r{i}" for i in range(pairs)],
        "m": margins, "g": pl.Series(list(gold), dtype=pl.String),
    })
    path, out = tmp_path / "t.parquet", tmp_path / "fixed.parquet"
    table.write_parquet(path)
    result = runner.invoke(app, ["audit", str(path), "--margin-col", "m", "--gold", "g", "--fix", "swap",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    fixed = pl.read_parquet(out)
    assert fixed["chosen"][0] == "r0" and fixed["g"][0] == "chosen" and fixed["suspicion"][0] == 0.0
    assert (fixed["g"][:100] == "chosen").all()  # every known wrong gold pair swapped back
    assert fixed["g"][100:].null_count() == pairs - 100
