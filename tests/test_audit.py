"""`prefnoise audit`: the mixture estimator, suspicion, cross-fitting and the CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise import noise_audit as A
from prefnoise.cli import app
from prefnoise.data import canonicalize, read_history, read_table
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import NoiseSpec, corrupt_frame
from tests.conftest import make_feature_pairs

runner = CliRunner()


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_em_recovers_mirrored_gaussians(rate):
    rng = np.random.default_rng(1)
    n = 20_000
    flipped = rng.random(n) < rate
    margins = rng.normal(2.0, 1.5, n)
    margins[flipped] *= -1
    mixture = A.fit_mirror_mixture(margins)
    assert abs(mixture.rate - rate) < 0.015
    assert mixture.mean == pytest.approx(2.0, abs=0.05) and mixture.std == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.2, 0.4])
def test_mirror_tail_count_on_half_normal_margins(rate):
    """Clean margins of a good model are half-normal plus noise, not Gaussian; the tail count copes."""
    rng = np.random.default_rng(2)
    n = 20_000
    learned = np.abs(rng.normal(size=n)) * 2 + rng.normal(0, 0.4, n)
    flipped = rng.random(n) < rate
    margins = np.where(flipped, -learned, learned)
    estimate = A.estimate_noise_rate(margins, n_boot=50)
    assert abs(estimate.rate - flipped.mean()) < 0.015
    assert estimate.low - 1e-3 <= estimate.rate <= estimate.high + 1e-3  # ε = 0 sits on the boundary
    assert estimate.mixture.rate == estimate.rate


def test_mirror_tail_count_by_hand():
    # |m| median is 2.5; above it: 3, -4, 5 → one negative of three
    assert A.mirror_tail_rate(np.array([1.0, -2.0, 3.0, -4.0, 5.0, 2.5])) == pytest.approx(1 / 3)


def test_posterior_is_the_closed_form_logistic():
    mixture = A.MirrorMixture(rate=0.2, mean=2.0, std=1.0, iterations=1, converged=True)
    # P(flip | m) = εφ(m+μ) / ((1−ε)φ(m−μ) + εφ(m+μ)); at m = 0 it is ε, at m = 1: 0.2e^-4.5/(0.8e^-0.5+0.2e^-4.5)
    assert mixture.posterior_flipped(np.array([0.0]))[0] == pytest.approx(0.2)
    expected = 0.2 * np.exp(-4.5) / (0.8 * np.exp(-0.5) + 0.2 * np.exp(-4.5))
    assert mixture.posterior_flipped(np.array([1.0]))[0] == pytest.approx(expected)


def test_auroc_and_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.1])
    labels = np.array([True, False, True, False])
    # positive/negative pairs: (0.9>0.8) 1, (0.9>0.1) 1, (0.8=0.8) 0.5, (0.8>0.1) 1 → 3.5/4
    assert A.auroc(scores, labels) == pytest.approx(0.875)
    assert A.precision_at(scores, labels, 2) == 0.5


def test_swap_fix_restores_found_flips():
    clean = canonicalize(make_feature_pairs(200))[0]
    noisy, _ = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.3, seed=2))
    # an oracle margin: negative exactly on the flipped rows
    margins = np.where(noisy["flipped"].to_numpy(), -3.0, 3.0)
    scored = A.add_suspicion(noisy.with_columns(pl.Series(A.MARGIN, margins)), A.MirrorMixture(0.3, 3.0, 1.0, 1, True))
    fixed, count = A.clean_table(scored, mode="swap", threshold=0.5)
    assert count == int(noisy["flipped"].sum())
    assert not fixed["flipped"].any()
    assert (
        fixed.select("pair_id", "chosen", "rejected")
        .sort("pair_id")
        .equals(clean.select("pair_id", "chosen", "rejected").sort("pair_id"))
    )
    dropped, count = A.clean_table(scored, mode="drop", threshold=0.5)
    assert dropped.height == 200 - count and not dropped["flipped"].any()


def test_cross_fitted_estimate_on_known_flips():
    clean = canonicalize(make_feature_pairs(3000, seed=3))[0]
    noisy, stats = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.2, seed=5))
    scored = A.out_of_fold_margins(
        noisy, folds=3, seed=0, fit_options={"epochs": 15, "hidden": 32, "val_fraction": 0.0}, device="cpu"
    )
    assert scored[A.MARGIN].is_null().sum() == 0 and scored[A.FOLD].n_unique() == 3
    estimate = A.estimate_noise_rate(scored[A.MARGIN].to_numpy(), n_boot=0)
    true_rate = stats.flips / stats.rows
    assert abs(estimate.rate - true_rate) < 0.05, (estimate.rate, true_rate)
    suspicion = A.add_suspicion(scored, estimate.mixture)[A.SUSPICION].to_numpy()
    assert A.auroc(suspicion, noisy["flipped"].to_numpy()) > 0.9


def test_fold_assignment_is_stable_under_row_order():
    clean = canonicalize(make_feature_pairs(300))[0]
    from prefnoise.reward import fold_of_pair_id

    folds = dict(zip(clean["pair_id"], np.asarray(fold_of_pair_id(clean["pair_id"], 5, 0))))
    shuffled = clean.sample(fraction=1.0, shuffle=True, seed=1)
    again = dict(zip(shuffled["pair_id"], np.asarray(fold_of_pair_id(shuffled["pair_id"], 5, 0))))
    assert folds == again


def test_audit_cli_end_to_end(tmp_path):
    clean = canonicalize(make_feature_pairs(1500, seed=4))[0]
    noisy, _ = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.2, seed=1))
    data = tmp_path / "noisy.parquet"
    noisy.write_parquet(data)
    out = tmp_path / "audited.parquet"
    args = [
        "audit",
        str(data),
        "--folds",
        "3",
        "--epochs",
        "10",
        "--hidden",
        "32",
        "--device",
        "cpu",
        "--bootstrap",
        "20",
        "--refits",
        "2",
        "--lr",
        "0.003",  # fold models strong enough for ε to be identifiable (at the default 1e-3 they are declined)
    ]
    result = runner.invoke(app, [*args, "--out", str(out), "--json", "--plot", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.1 < report["noise_rate"]["rate"] < 0.3
    assert report["identifiable"] and len(report["noise_rate"]["refits"]) == 2
    assert report["noise_rate"]["own_error_bias_high"] <= A.MAX_OWN_ERROR
    assert report["against_flipped"]["auroc"] > 0.85
    audited = read_table(out)
    assert set(noisy.columns) | {"fold", "oof_margin", "suspicion"} == set(audited.columns)
    assert read_history(out)[-1]["command"] == "audit"
    assert read_history(out)[-1]["noise_estimate"]["identifiable"] is True
    assert read_history(out)[-1]["parameters"]["refits"] == 2
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --estimate-only prints one number
    only = runner.invoke(app, [*args, "--estimate-only", "--bootstrap", "0"])
    assert only.exit_code == 0 and 0.1 < float(only.stdout.strip()) < 0.3
    # --fix swap writes a table whose suspects were swapped back, recorded in the history
    fixed = tmp_path / "fixed.parquet"
    result = runner.invoke(app, [*args, "--out", str(fixed), "--fix", "swap", "--json"])
    assert result.exit_code == 0
    history = read_history(fixed)[-1]
    assert history["fixed_pairs"]["mode"] == "swap" and history["fixed_pairs"]["count"] > 0
    # exactly the suspects of the first (identically seeded) run were swapped back
    expected = audited.select("pair_id", (pl.col("flipped") ^ (pl.col("suspicion") > 0.5)).alias("expected"))
    got = read_table(fixed).join(expected, on="pair_id")
    assert got.height == 1500 and (got["flipped"] == got["expected"]).all()
    assert got["flipped"].mean() < noisy["flipped"].mean()  # more right swaps than wrong ones


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fix", "swap"], "--fix needs --out"),
        (["--folds", "1"], "--folds must be >= 2, got 1"),
        (["--out", "x.parquet", "--fix", "burn"], "--fix must be 'drop' or 'swap'"),
    ],
)
def test_audit_bad_input_exits_2(tmp_path, sample_path, extra, message):
    result = runner.invoke(app, ["audit", str(sample_path), "--epochs", "1", *extra])
    assert result.exit_code == 2
    assert message in result.stderr


def test_too_few_pairs_for_folds():
    frame = canonicalize(make_feature_pairs(5))[0]
    with pytest.raises(PrefnoiseError, match="too few for 5 folds"):
        A.out_of_fold_margins(frame, folds=5)


def test_audit_history_records_the_duration_of_the_folds(tmp_path, monkeypatch):
    """The provenance duration covers the cross-fitting, not only the writing (it read 0.014 s before)."""
    import time

    from prefnoise.noise_audit import cross_fit

    real = cross_fit.stacked_cross_fits  # the fold models of every refit, trained as one stack

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(cross_fit, "stacked_cross_fits", slow)
    data = tmp_path / "pairs.parquet"
    canonicalize(make_feature_pairs(200, seed=1))[0].write_parquet(data)
    out = tmp_path / "audited.parquet"
    args = ["audit", str(data), "--folds", "2", "--epochs", "1", "--bootstrap", "0", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_history(out)[-1]["duration_s"] >= 0.5
