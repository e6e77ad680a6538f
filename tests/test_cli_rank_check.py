"""`prefnoise rank-check` through the CLI: exit codes, JSON, the figure, stdin."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app

runner = CliRunner()


def scored_table(path, n=300, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, 2))
    r = s + noise * rng.normal(size=(n, 2))
    pl.DataFrame(
        {
            "prompt": [f"p{i % 100}" for i in range(n)],
            "chosen": [f"c{i}" for i in range(n)],
            "rejected": [f"r{i}" for i in range(n)],
            "chosen_score": s[:, 0],
            "rejected_score": s[:, 1],
            "chosen_reward": r[:, 0],
            "rejected_reward": r[:, 1],
            "flipped": rng.random(n) < 0.2,
        }
    ).write_parquet(path)
    return path


def test_json_report_and_passing_gate(tmp_path):
    data = scored_table(tmp_path / "d.parquet")
    result = runner.invoke(app, ["rank-check", str(data), "--json", "--min-agreement", "0.6", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.6 < report["overall"]["agreement"]["value"] < 1.0
    assert set(report["splits"]["flipped"]) == {"false", "true"}
    value = report["overall"]["agreement"]["value"]
    assert report["gates"] == [{"metric": "agreement", "op": ">=", "threshold": 0.6, "value": value, "passed": True}]


def test_failing_gates_exit_1_after_printing(tmp_path):
    data = scored_table(tmp_path / "d.parquet")
    result = runner.invoke(app, ["rank-check", str(data), "--min-kendall", "0.99", "--min-preservation", "0.999"])
    assert result.exit_code == 1
    assert "pairwise agreement" in result.stdout and "gate failed" in result.stdout
    assert "kendall_tau_b" in result.stdout and "preservation" in result.stdout


def test_bad_input_exits_2(tmp_path):
    bare = tmp_path / "bare.parquet"
    pl.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}).write_parquet(bare)
    result = runner.invoke(app, ["rank-check", str(bare)])
    assert result.exit_code == 2 and "chosen_reward" in result.output
    assert runner.invoke(app, ["rank-check", str(tmp_path / "missing.parquet")]).exit_code == 2
    data = scored_table(tmp_path / "d.parquet")
    assert runner.invoke(app, ["rank-check", str(data), "--group-by", "nope"]).exit_code == 2


def test_a_table_without_one_finite_reward_names_the_file_its_first_row_and_column(tmp_path):
    pairs = pl.read_parquet(scored_table(tmp_path / "d.parquet", n=6))
    rewards = pairs.with_columns(
        pl.Series("chosen_reward", [1.0, np.nan, 2.0, 3.0, 4.0, 5.0]),
        pl.Series("rejected_reward", [np.inf, 0.0, np.nan, -np.inf, None, np.nan]),
    )
    rewards.write_parquet(tmp_path / "nan.parquet")
    result = runner.invoke(app, ["rank-check", str(tmp_path / "nan.parquet")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"Error: {tmp_path / 'nan.parquet'}: no rows with both a predicted and a reference reward to compare: all 6 "
        "rows were skipped, the first at row 1, whose column 'rejected_reward' holds inf; every reward must be a "
        "finite number\n"
    )
    pl.DataFrame({"prompt_id": ["p", "p"], "reward": [1.0, 2.0], "score": [None, float("-inf")]}).write_parquet(
        tmp_path / "long.parquet")
    result = runner.invoke(app, ["rank-check", str(tmp_path / "long.parquet"), "--long"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {tmp_path / 'long.parquet'}: no rows with both a predicted and a reference reward to compare: all 2 "
        "rows were skipped, the first at row 1, whose column 'score' holds a missing value (null); every reward "
        "must be a finite number\n"
    )


def test_plot_is_a_png(tmp_path):
    data = scored_table(tmp_path / "d.parquet")
    out = tmp_path / "fig.png"
    result = runner.invoke(app, ["rank-check", str(data), "--plot", str(out), "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    blob = out.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000


def test_stdin_long_table_and_worst(tmp_path):
    long = tmp_path / "long.parquet"
    pl.DataFrame(
        {
            "prompt_id": ["a", "a", "a", "b", "b"],
            "response": list("vwxyz"),
            "reward": [3.0, 2.0, 1.0, 1.0, 2.0],
            "score": [3.0, 2.0, 1.0, 2.0, 1.0],
        }
    ).write_parquet(long)
    result = runner.invoke(
        app, ["rank-check", "-", "--json", "--show-worst", "1", "--bootstrap", "50"], input=long.read_bytes()
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "long"
    assert report["overall"]["agreement"]["value"] == 0.75  # 3 of prompt a's pairs right, b's wrong
    assert report["worst"][0]["signed_margin"] == -1.0


def test_small_memory_budget_spills_and_gives_the_same_report(tmp_path):
    data = scored_table(tmp_path / "d.parquet", n=400)
    spill = tmp_path / "spill"
    spill.mkdir()
    args = ["rank-check", str(data), "--json", "--bootstrap", "100"]
    whole = json.loads(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--memory-responses", "60", "--temp-dir", str(spill)])
    assert result.exit_code == 0, result.output
    split = json.loads(result.stdout)
    assert split["overall"]["kendall_tau_b"] == pytest.approx(whole["overall"]["kendall_tau_b"], abs=1e-12)
    assert split["overall"]["agreement"] == whole["overall"]["agreement"]
    assert split["splits"]["flipped"]["true"]["preservation"] == whole["splits"]["flipped"]["true"]["preservation"]
    assert list(spill.iterdir()) == []
    bad = runner.invoke(app, [*args, "--memory-responses", "60", "--temp-dir", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "temporary directory" in bad.output
