"""Is the flip rate identifiable from out-of-fold margins? The own-error correction, the verdict, --reward-col."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

from prefnoise import noise_audit as A
from prefnoise.cli import app
from prefnoise.data import canonicalize, read_history
from prefnoise.errors import PrefnoiseError
from tests.conftest import make_feature_pairs

runner = CliRunner()


def mirrored(clean: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, float]:
    """Margins with a share ``rate`` of the pairs flipped (sign mirrored), and the realized share."""
    flipped = np.random.default_rng(seed).random(clean.size) < rate
    return np.where(flipped, -clean, clean), float(flipped.mean())


def half_normal(n: int, noise: float, seed: int) -> np.ndarray:
    """A good model on a linear reward: half-normal clean margins plus the model's own noise."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(size=n)) * 2 + rng.normal(0, noise, n)


# ---- the formulas, by hand -------------------------------------------------------------------------


def test_own_error_share_by_hand():
    # σ(−k·u): at u = 0 a clean model is a coin; at k·u = 2 it is wrong with 1/(1 + e²) = 0.1192
    assert A.own_error_share(2.0, np.array([0.0, 1.0])) == pytest.approx([0.5, 1 / (1 + math.e**2)])


def test_wrong_sign_probability_by_hand():
    # a clean pair is wrong with e = 0.1, a flipped one with 0.9: 0.8·0.1 + 0.2·0.9 = 0.26
    assert A.wrong_sign_probability(np.array([0.1]), 0.2)[0] == pytest.approx(0.26)


def test_corrected_rate_by_hand():
    assert A.corrected_rate(0.26, 0.1) == pytest.approx(0.2)  # (0.26 − 0.1)/(1 − 0.2)
    assert A.corrected_rate(0.3, 0.0) == pytest.approx(0.3)  # no own errors: the tail share itself
    assert A.corrected_rate(0.05, 0.1) == 0.0  # fewer wrong signs than the model alone makes: clipped


@pytest.mark.parametrize(
    ("confident", "bias_high", "low", "high", "fragment"),
    [
        (50, 0.01, 0.1, 0.2, "only 50 confident pairs"),
        (500, 0.3, 0.1, 0.2, "up to 30% of the confident pairs"),
        (500, 0.05, 0.1, 0.4, "wider than 0.25"),
        (500, 0.05, 0.1, 0.2, None),
        (500, 0.05, None, None, None),  # no bootstrap, no width to judge
    ],
)
def test_identifiability_reason(confident, bias_high, low, high, fragment):
    reason = A.identifiability_reason(confident, bias_high, low, high, agreement=0.7)
    assert reason is None if fragment is None else fragment in reason


def test_own_error_fit_on_pure_flips():
    # |m| = 1..1000, every 5th pair negative at every |m|: the wrong signs are all flips (ε = 0.2, b ≈ 0)
    magnitude = np.arange(1, 1001, dtype=float)
    margins = np.where(np.arange(1000) % 5 == 0, -magnitude, magnitude)
    fit = A.fit_own_error(margins)
    assert fit.cut == pytest.approx(500.5) and fit.confident_pairs == 500
    assert fit.rate == pytest.approx(0.2, abs=0.005)
    assert fit.bias < 1e-3 and fit.bias_high < 0.01


def test_own_error_fit_matches_the_gaussian_truth():
    """For clean margins N(μ, σ²) the own-error curve is exactly logistic; b = P(m < −t)/P(|m| > t)."""
    rng = np.random.default_rng(0)
    margins, realized = mirrored(rng.normal(1.0, 1.0, 20_000), 0.2, seed=1)
    fit = A.fit_own_error(margins)
    t = fit.cut
    exact = norm.cdf(-t - 1.0) / (norm.cdf(-t - 1.0) + norm.sf(t - 1.0))  # 0.040 at t ≈ 1.05
    assert fit.bias == pytest.approx(exact, abs=0.01)
    assert fit.slope == pytest.approx(2 * 1.0 * t / 1.0, rel=0.25)  # k = 2μt/σ²
    assert fit.bias_low <= exact <= fit.bias_high
    estimate = A.estimate_noise_rate(margins, n_boot=50)
    assert estimate.identifiable and abs(estimate.rate - realized) < 0.015


# ---- the verdict on generated margins ---------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_strong_half_normal_model_is_identifiable(rate):
    """Half-normal (not Gaussian) clean margins of a good model must not make the verdict fail."""
    margins, realized = mirrored(half_normal(8000, 0.3, seed=2), rate, seed=3)
    estimate = A.estimate_noise_rate(margins, n_boot=100)
    assert estimate.identifiable, estimate.reason
    assert abs(estimate.rate - realized) < 0.02
    assert estimate.low - 1e-9 <= realized <= estimate.high + 1e-9
    assert estimate.mixture.rate == estimate.rate


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_model_at_chance_is_declined(rate):
    rng = np.random.default_rng(4)
    margins, _ = mirrored(rng.normal(0.05, 1.0, 3000), rate, seed=5)
    estimate = A.estimate_noise_rate(margins, n_boot=50)
    assert not estimate.identifiable and estimate.rate is None and estimate.low is None
    assert "cannot be told apart from flips" in estimate.reason and "stronger reward model" in estimate.reason
    assert estimate.mixture is None
    assert all(r["rate"] is None for r in estimate.refits)


def test_weak_clean_model_is_declined_not_read_as_noise():
    """Clean labels, a weak model (μ/σ = 0.3): the raw tail share reads 0.3+; the verdict declines."""
    rng = np.random.default_rng(6)
    margins = rng.normal(0.3, 1.0, 3000)
    assert A.mirror_tail_rate(margins) > 0.25
    assert not A.estimate_noise_rate(margins, n_boot=50).identifiable


def test_too_few_pairs_are_declined():
    margins, _ = mirrored(half_normal(150, 0.1, seed=7), 0.2, seed=8)
    estimate = A.estimate_noise_rate(margins, n_boot=20)
    assert not estimate.identifiable and "only 75 confident pairs" in estimate.reason


def test_mostly_zero_margins_are_declined():
    margins = np.concatenate([np.zeros(600), half_normal(400, 0.1, seed=17)])  # collapsed fold models
    estimate = A.estimate_noise_rate(margins, n_boot=10)
    assert not estimate.identifiable and "exactly 0" in estimate.reason
    assert estimate.label_agreement == pytest.approx(0.3 + (margins[600:] > 0).mean() * 0.4)  # a tie counts 1/2


def test_one_refit_without_signal_is_not_averaged_away():
    rng = np.random.default_rng(18)
    good, chance = np.abs(rng.normal(size=2000)) * 2, rng.normal(0, 1, 2000)
    estimate = A.estimate_noise_rate(np.stack([good, good, chance]), n_boot=20)
    assert not estimate.identifiable and estimate.rate is None


def test_refits_pool_into_one_interval():
    clean = half_normal(4000, 0.3, seed=9)
    noise = np.random.default_rng(10).normal(0, 0.3, (3, 4000))
    margins, realized = mirrored(clean, 0.2, seed=11)
    estimate = A.estimate_noise_rate(margins + noise, n_boot=50)  # three cross-fits: same labels, other models
    assert len(estimate.refits) == 3 and estimate.identifiable
    assert estimate.rate == pytest.approx(np.mean([r["rate"] for r in estimate.refits]))
    assert estimate.low <= min(r["rate"] for r in estimate.refits) <= max(r["rate"] for r in estimate.refits)
    assert abs(estimate.rate - realized) < 0.03


def test_verdict_across_model_strengths():
    """Weak → strong models at ε ∈ {0, 0.2, 0.4}: when identifiable, within 0.1 and (95% intervals: nearly
    always) covered; models near chance declined."""
    accepted = covered = 0
    for strength in (0.0, 0.2, 0.5, 1.0, 2.0):  # clean margins N(strength, 1)
        for rate in (0.0, 0.2, 0.4):
            for seed in range(3):
                rng = np.random.default_rng(100 * seed + int(10 * strength))
                margins, realized = mirrored(rng.normal(strength, 1.0, 2000), rate, seed=seed)
                estimate = A.estimate_noise_rate(margins, n_boot=40, seed=seed)
                if strength <= 0.2:
                    assert not estimate.identifiable, (strength, rate, seed, estimate.rate)
                if estimate.identifiable:
                    accepted += 1
                    assert abs(estimate.rate - realized) <= 0.1, (strength, rate, seed)
                    covered += estimate.low <= realized <= estimate.high
    assert accepted >= 9  # at least the strongest models are read
    assert covered >= accepted - 1


# ---- precomputed predictions (--reward-col / --margin-col) -------------------------------------------


def predictions_table(n: int, margins: np.ndarray) -> pl.DataFrame:
    frame = canonicalize(make_feature_pairs(n, seed=12))[0]
    return frame.with_columns(
        pl.Series("chosen_reward", margins), pl.Series("rejected_reward", np.zeros(n)), pl.Series("m", margins)
    )


def test_given_margins_from_reward_or_margin_column():
    frame = predictions_table(4, np.array([1.0, -2.0, 3.0, 0.5]))
    by_reward = A.given_margins(frame, reward_col="reward")
    assert by_reward[A.MARGIN].to_list() == [1.0, -2.0, 3.0, 0.5]
    assert A.given_margins(frame, margin_col="m")[A.MARGIN].to_list() == [1.0, -2.0, 3.0, 0.5]
    with pytest.raises(PrefnoiseError, match="'chosen_score2' not found"):
        A.given_margins(frame, reward_col="score2")
    with pytest.raises(PrefnoiseError, match=r"^data: column 'm' has a missing value \(null\) at row 2; "):  # from 1
        A.given_margins(frame.with_columns(pl.Series("m", [1.0, None, 2.0, 3.0])), margin_col="m")


def test_cli_non_finite_given_margins_name_the_file_row_and_column(tmp_path):
    data = tmp_path / "scored.parquet"
    table = predictions_table(5, np.array([1.0, -2.0, 3.0, 0.5, 2.0]))
    table.with_columns(pl.Series("m", [1.0, -2.0, np.nan, 0.5, np.inf])).write_parquet(data)
    result = runner.invoke(app, ["audit", str(data), "--margin-col", "m"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"Error: {data}: column 'm' has nan at row 3, and 1 more row(s); a margin needs a finite number in every "
        "row: fix those scores or leave their rows out\n"
    )
    table.with_columns(pl.Series("rejected_reward", [0.0, 0.0, 0.0, -np.inf, 0.0])).write_parquet(data)
    result = runner.invoke(app, ["audit", str(data), "--reward-col", "reward"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {data}: column 'rejected_reward' has -inf at row 4; a margin needs a finite number in every row: "
        "fix those scores or leave their rows out\n"
    )


def test_given_margins_refuse_rows_the_model_saw():
    frame = predictions_table(4, np.ones(4)).with_columns(
        pl.Series("in_training", [False, True, False, False]), pl.Series("in_validation", [False] * 4)
    )
    with pytest.raises(PrefnoiseError, match="1 rows were seen by the model .* first row 2"):
        A.given_margins(frame, reward_col="reward")


def test_cli_reward_col_identifiable(tmp_path):
    margins, realized = mirrored(half_normal(3000, 0.3, seed=13), 0.2, seed=14)
    data = tmp_path / "scored.parquet"
    predictions_table(3000, margins).write_parquet(data)
    result = runner.invoke(app, ["audit", str(data), "--reward-col", "reward", "--json", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identifiable"] and report["folds"] is None
    assert report["margins_from"] == "columns chosen_reward − rejected_reward"
    assert abs(report["noise_rate"]["rate"] - realized) < 0.03
    text = runner.invoke(app, ["audit", str(data), "--margin-col", "m", "--bootstrap", "20"])
    assert text.exit_code == 0 and "valid only if the predictions were made out of sample" in text.output


def test_cli_undetermined_rate(tmp_path):
    """A chance-level predictor: JSON "rate": null with a reason, --estimate-only and --fix exit 4."""
    margins = np.random.default_rng(15).normal(0.0, 1.0, 1000)
    data = tmp_path / "chance.parquet"
    predictions_table(1000, margins).write_parquet(data)
    args = ["audit", str(data), "--reward-col", "reward", "--bootstrap", "20"]
    out = tmp_path / "audited.parquet"
    result = runner.invoke(app, [*args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identifiable"] is False and report["noise_rate"]["rate"] is None
    assert "cannot be told apart from flips" in report["noise_rate"]["reason"]
    assert report["suspects_above_threshold"] is None and report["most_suspect"][0]["suspicion"] is None
    history = read_history(out)[-1]["noise_estimate"]
    assert history["rate"] is None and "cannot be told apart" in history["reason"]
    only = runner.invoke(app, [*args, "--estimate-only"])
    assert only.exit_code == 4 and only.stdout == ""
    assert only.stderr.startswith("Error: flip rate undetermined: ") and only.stderr.count("\n") == 1
    fixed = tmp_path / "fixed.parquet"
    refused = runner.invoke(app, [*args, "--out", str(fixed), "--fix", "drop"])
    assert refused.exit_code == 4 and "suspicion has no calibration; nothing written" in refused.stderr
    assert not fixed.exists()
    text = runner.invoke(app, args)
    assert "ε̂: undetermined — the fold models' own confident mistakes" in text.output


def test_cli_fold_models_near_chance_exit_4(tmp_path):
    """End to end through the fold models: 200 pairs and one epoch learn too little to read ε."""
    data = tmp_path / "pairs.parquet"
    canonicalize(make_feature_pairs(200, seed=16))[0].write_parquet(data)
    args = ["audit", str(data), "--folds", "2", "--refits", "2", "--epochs", "1", "--hidden", "8"]
    result = runner.invoke(app, [*args, "--bootstrap", "10", "--estimate-only", "--device", "cpu"])
    assert result.exit_code == 4, result.output
    assert "flip rate undetermined" in result.stderr and result.stdout == ""
    report = json.loads(runner.invoke(app, [*args, "--bootstrap", "10", "--json", "--device", "cpu"]).stdout)
    assert report["noise_rate"]["rate"] is None and len(report["noise_rate"]["refits"]) == 2


def test_cli_refits_and_margin_options_are_checked(tmp_path, sample_path):
    both = runner.invoke(app, ["audit", str(sample_path), "--reward-col", "r", "--margin-col", "m"])
    assert both.exit_code == 2 and "only one of --reward-col and --margin-col" in both.stderr
    zero = runner.invoke(app, ["audit", str(sample_path), "--refits", "0"])
    assert zero.exit_code == 2 and "--refits must be >= 1" in zero.stderr


def test_embed_features_reach_the_fold_models(monkeypatch, tmp_path):
    import polars as pl

    from prefnoise import api
    from prefnoise.noise_audit import run

    seen = {}

    def fake_cross_fit(frame, *, fit_options, **kwargs):
        seen.update(fit_options)
        raise RuntimeError("stop after the options were seen")

    monkeypatch.setattr(run, "cross_fitted_margins", fake_cross_fit)
    table = pl.DataFrame({"prompt": ["p"] * 20, "chosen": [f"a{i}" for i in range(20)], "rejected": ["b"] * 20})
    with pytest.raises(RuntimeError, match="options were seen"):
        api.audit(table, model="embed+mlp", encoder=str(tmp_path), embed_features="joint-mean,response-mean")
    assert seen["embed_features"] == "joint-mean,response-mean" and seen["backend"] == "embed+mlp"
