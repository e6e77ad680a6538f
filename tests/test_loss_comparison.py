"""`prefnoise reproduce DATA`: the paired statistics by hand, the grid with a stand-in fitter (caching,
resuming), the real grid on generated pairs, and the CLI's bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise import columns as C
from prefnoise.cli import app
from prefnoise.errors import PrefnoiseError
from prefnoise.experiments.features import linear_feature_pairs
from prefnoise.experiments.loss_comparison import CellCache, ComparisonOptions, run_grid, summarize
from prefnoise.metrics import tie_half_outcomes
from prefnoise.metrics.paired import Estimate, cluster_codes, two_stage_mean, verdict
from prefnoise.options import OptionError

runner = CliRunner()


# --------------------------------------------------------------------------- the statistics, by hand


def test_tie_half_outcomes_follow_the_one_tie_rule():
    got = tie_half_outcomes(np.array([2.0, 0.0, -1.0, 3.0, -2.0]), np.array([1, 1, 1, 0, -1]))
    assert got[:3].tolist() == [1.0, 0.5, 0.0] and math.isnan(got[3]) and got[4] == 1.0
    assert tie_half_outcomes(np.array([1.0, -1.0])).tolist() == [1.0, 0.0]  # default reference: the labels


def test_cluster_codes_number_clusters_by_first_appearance():
    assert cluster_codes(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_two_stage_mean_is_the_mean_of_seed_means():
    # seed 0: pairs 1, 0, 1, 1 (mean 0.75); seed 1: 0, 0 (mean 0); NaN (a reference tie) is left out
    est = two_stage_mean([np.array([1.0, 0.0, 1.0, 1.0, np.nan]), np.array([0.0, 0.0])],
                         [np.array([0, 0, 1, 1, 1]), np.array([0, 1])], n_boot=0)
    assert est.value == pytest.approx(0.375) and est.seeds == 2 and est.pairs == 3  # mean of 4 and 2 pairs
    assert math.isnan(est.low) and math.isnan(est.high)


def test_two_stage_interval_is_degenerate_for_constant_values_and_covers_the_mean():
    constant = two_stage_mean([np.full(30, 0.25)], [np.arange(30) // 3], n_boot=500, seed=1)
    assert constant.low == pytest.approx(0.25) and constant.high == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    values = [rng.normal(0.1, 1.0, 400) for _ in range(3)]
    est = two_stage_mean(values, [np.arange(400) // 4] * 3, n_boot=2000, seed=2)
    assert est.low < est.value < est.high and est.high - est.low < 0.3


def test_verdict_says_who_is_ahead_or_that_the_data_cannot_tell():
    assert verdict("sigmoid", "logistic", Estimate(0.11, 0.06, 0.16, 200, 3)) == (
        "sigmoid ahead of logistic by 0.11 [0.06, 0.16]")
    assert verdict("hinge", "logistic", Estimate(-0.11, -0.16, -0.06, 200, 3)) == (
        "hinge behind logistic by 0.11 [0.06, 0.16]")
    assert verdict("ramp", "logistic", Estimate(0.02, -0.05, 0.09, 175, 1)) == (
        "ramp and logistic cannot be told apart at this size (175 test pairs, 1 seed)")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("changes", "option"), [
    ({"losses": ("sigmoid", "nope")}, "losses"),
    ({"losses": ("rdpo",)}, "losses"),
    ({"reference": "nope"}, "losses"),
    ({"rates": (0.0, 0.5)}, "rates"),
    ({"rates": (-0.1,)}, "rates"),
    ({"noise": "bt"}, "noise"),
    ({"seeds": 0}, "seeds"),
])
def test_bad_grid_options_name_their_keyword(changes, option):
    with pytest.raises(OptionError) as raised:
        ComparisonOptions(**changes)
    assert raised.value.option == option and str(raised.value).startswith(f"{option}= ")


def test_reference_joins_the_compared_losses():
    assert ComparisonOptions(losses=("sigmoid",), reference="logistic").all_losses == ("sigmoid", "logistic")


# --------------------------------------------------------------------------- the grid with a stand-in fitter


def _pairs(n: int = 300) -> pl.DataFrame:
    from prefnoise.api import as_polars

    return as_polars(linear_feature_pairs(n, 4, seed=3))


def _fitter(calls: list):
    """sigmoid ranks by the true score; logistic by a score the training noise rate corrupts."""
    def fit_cell(train, test, loss, seed):
        calls.append((loss, seed))
        rate = float(train[C.FLIPPED].mean()) if C.FLIPPED in train.columns else 0.0
        true = np.column_stack([test[C.chosen(C.SCORE)].to_numpy(), test[C.rejected(C.SCORE)].to_numpy()])
        if loss == "sigmoid" or rate == 0:
            return true
        noise = np.random.default_rng(seed).normal(0, 8 * rate, size=true.shape)
        return true + noise
    return fit_cell


def test_paired_comparison_finds_the_lead_and_declines_without_one(tmp_path):
    options = ComparisonOptions(losses=("sigmoid",), rates=(0.0, 0.4), seeds=2, bootstrap=500)
    frame = _pairs()
    rows = run_grid(frame, options, _fitter([]))
    summary = summarize(rows, options)
    at = {c["rate"]: c for c in summary["comparisons"]}
    assert at[0.0]["difference"] == 0.0 and at[0.0]["verdict"].startswith("sigmoid and logistic cannot be told apart")
    assert at[0.4]["low"] > 0 and at[0.4]["verdict"].startswith("sigmoid ahead of logistic by")
    assert set(at[0.4]) >= {"loss", "reference", "rate", "difference", "low", "high", "verdict"}
    sigmoid = next(c for c in summary["cells"] if c["loss"] == "sigmoid" and c["rate"] == 0.4)
    assert sigmoid["true_agreement"]["value"] == 1.0 and sigmoid["kendall"]["value"] == pytest.approx(1.0)
    assert summary["metric"] == "agreement with the true order"


def test_cells_are_cached_and_an_interrupted_grid_continues(tmp_path):
    options = ComparisonOptions(losses=("sigmoid",), rates=(0.0, 0.4), seeds=1, bootstrap=0)
    frame, fingerprint = _pairs(), {"data": "x"}
    calls: list = []
    fit = _fitter(calls)

    def interrupted(train, test, loss, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(train, test, loss, seed)

    with pytest.raises(KeyboardInterrupt):
        run_grid(frame, options, interrupted, CellCache(tmp_path / "cells", fingerprint))
    assert CellCache(tmp_path / "cells", fingerprint).count() == 2
    calls.clear()
    rows = run_grid(frame, options, fit, CellCache(tmp_path / "cells", fingerprint))
    assert len(calls) == 2 and rows["loss"].n_unique() == 2  # only the two missing cells were fitted
    with pytest.raises(PrefnoiseError, match="another grid or other data"):
        CellCache(tmp_path / "cells", {"data": "y"})


def test_data_too_small_to_split_is_refused():
    frame = _pairs(40).with_columns(pl.lit("one prompt").alias(C.PROMPT))
    with pytest.raises(PrefnoiseError, match=r"split into \d+ train and \d+ test pairs"):
        run_grid(frame, ComparisonOptions(seeds=1), _fitter([]))


# --------------------------------------------------------------------------- real fits


@pytest.mark.slow
def test_sigmoid_leads_logistic_at_40_percent_and_not_at_0(tmp_path):
    import prefnoise as pn

    frame = linear_feature_pairs(SIZE, DIM, seed=1)
    result = pn.compare_losses(frame, tmp_path / "grid", losses=["sigmoid"], rates=[0.0, 0.4], seeds=SEEDS,
                               test_fraction=0.3, bootstrap=1000, epochs=EPOCHS, hidden=HIDDEN)
    at = {c["rate"]: c for c in result.summary["comparisons"]}
    assert at[0.4]["low"] > 0, at[0.4]["verdict"]
    assert "cannot be told apart" in at[0.0]["verdict"]
    written = sorted(p.name for p in (tmp_path / "grid").iterdir() if not p.name.startswith("."))
    assert written == ["results.md", "results.parquet", "robustness.png", "summary.json"]
    assert not list(tmp_path.glob(".grid.cells-*"))  # the cell cache goes once the grid is written


SIZE, DIM, HIDDEN, EPOCHS, SEEDS = 400, 32, 128, 200, 1


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def small_pairs(tmp_path):
    path = tmp_path / "pairs.parquet"
    linear_feature_pairs(120, 4, seed=0).write_parquet(path)
    return path


def test_cli_runs_reproduce_data_and_prints_json(small_pairs, tmp_path):
    out = tmp_path / "grid"
    done = runner.invoke(app, ["reproduce", str(small_pairs), "--out", str(out), "--losses", "sigmoid",
                               "--rates", "0,0.2", "--seeds", "1", "--epochs", "2", "--bootstrap", "100", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert [c["rate"] for c in summary["comparisons"]] == [0.0, 0.2]
    assert {c["loss"] for c in summary["cells"]} == {"sigmoid", "logistic"}
    assert (out / "summary.json").is_file() and (out / "results.md").read_text().startswith("# Which loss")


@pytest.mark.parametrize(("args", "message"), [
    (["--losses", "sigmoid,nope"], "--losses has 'nope', not in the loss table"),
    (["--rates", "0,0.5"], "--rates must be distinct noise rates in [0, 0.5), got 0,0.5"),
    (["--rates", "0,x"], "--rates takes comma-separated numbers"),
    (["--test-fraction", "0.001"], "split into 120 train and 0 test pairs"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(small_pairs, tmp_path, args, message):
    out = tmp_path / "grid"
    done = runner.invoke(app, ["reproduce", str(small_pairs), "--out", str(out), "--epochs", "1", *args])
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists() and not list(tmp_path.glob(".grid*"))
