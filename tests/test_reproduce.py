"""`prefnoise reproduce synthetic --quick`: files, every cell, a valid figure, and the paper's direction."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.experiments import synthetic as S
from prefnoise.experiments.digits import digit_pairs, load_images, split_images

runner = CliRunner()


def test_digit_pairs_follow_bradley_terry_on_the_digit_gap():
    images, digits = load_images()
    assert images.shape == (1797, 64) and 0.0 <= images.min() and images.max() <= 1.0
    train, test = split_images(len(images), 0.2, seed=0)
    assert len(set(train) & set(test)) == 0 and len(test) == 359
    pairs = digit_pairs(images, digits, train, 20_000, seed=1)
    gap = (pairs["chosen_score"] - pairs["rejected_score"]).abs().to_numpy()
    agrees = (pairs["chosen_score"] > pairs["rejected_score"]).to_numpy()
    assert (gap > 0).all()  # same-digit pairs are skipped
    # P(label agrees with the digit order | gap g) = σ(g); check g = 1 and g = 3 within 5 sigma
    for g in (1, 3):
        sel = gap == g
        p = 1 / (1 + np.exp(-g))
        assert abs(agrees[sel].mean() - p) < 5 * np.sqrt(p * (1 - p) / sel.sum())
    assert abs(pairs["first_is_chosen"].mean() - 0.5) < 0.02


def test_noise_for_asymmetric_flips_first_preferred_pairs_more():
    spec = S.noise_for("asymmetric", 0.4, seed=3)
    assert (spec.rate_pos, spec.rate_neg, spec.by) == (0.4, 0.2, "column:first_is_chosen")


def test_mnist_npz_is_read(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    y = np.arange(10)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y)
    images, digits = load_images(tmp_path / "mnist.npz")
    assert images.shape == (10, 784) and images.max() <= 1.0 and digits.tolist() == list(range(10))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "synthetic"
    result = runner.invoke(app, ["reproduce", "synthetic", "--out", str(out), "--quick", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.xdist_group("reproduce-synthetic")  # one worker builds the module's quick run once
def test_quick_synthetic_writes_every_cell_and_a_figure(quick_run):
    out, payload = quick_run
    config = S.SyntheticConfig.quick()
    results = pl.read_parquet(out / "results.parquet")
    assert results.height == config.cells() == payload["cells"]
    cells = set(results.select("kind", "rate", "loss").iter_rows())
    assert cells == {(k, r, loss) for k in config.kinds for r in config.rates for loss in config.losses}
    assert results["test_agreement"].is_between(0.0, 1.0).all()
    table = (out / "results.md").read_text()
    assert "| **sigmoid** |" in table and "| logistic |" in table
    png = (out / "robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.xdist_group("reproduce-synthetic")  # one worker builds the module's quick run once
def test_quick_synthetic_agrees_with_the_papers_direction(quick_run):
    """At the highest noise rate, symmetric losses rank held-out pairs at least as well as logistic."""
    out, payload = quick_run
    results = pl.read_parquet(out / "results.parquet")
    top = max(S.SyntheticConfig.quick().rates)
    symmetric = S.mean_agreement_at(results, top, ["sigmoid", "ramp"])
    logistic = S.mean_agreement_at(results, top, ["logistic"])
    assert symmetric >= logistic, (symmetric, logistic)
    assert payload["mean_agreement_at_highest_rate"]["symmetric"] == pytest.approx(symmetric)


def test_bad_options_exit_2(tmp_path):
    result = runner.invoke(app, ["reproduce", "synthetic", "--out", str(tmp_path / "x"), "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.stderr
    result = runner.invoke(
        app, ["reproduce", "synthetic", "--out", str(tmp_path / "x"), "--mnist", str(tmp_path / "no.npz")]
    )
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not (tmp_path / "x").exists()
