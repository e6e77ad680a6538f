"""`prefnoise corrupt` and `prefnoise inspect` through the CLI, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.data import read_history, read_table

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_corrupt_writes_flips_and_history(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    result = run("corrupt", sample_path, out, "--rate", "0.2", "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    noisy = read_table(out)
    clean = read_table(sample_path)
    assert summary["rows"] == 400 == noisy.height
    assert summary["flips"] == int(noisy["flipped"].sum()) > 0
    # flipped rows have their responses (and their scores) swapped, others are untouched
    joined = noisy.join(clean, on="pair_id", suffix="_clean")
    flipped = joined.filter("flipped")
    assert (flipped["chosen"] == flipped["rejected_clean"]).all()
    assert (flipped["chosen_score"] < flipped["rejected_score"]).all()
    kept = joined.filter(~pl.col("flipped"))
    assert (kept["chosen"] == kept["chosen_clean"]).all()
    history = read_history(out)
    assert [h["command"] for h in history] == ["make_sample", "corrupt"]
    assert history[-1]["seed"] == 3 and history[-1]["parameters"]["rate"] == 0.2
    # the same seed gives the same file content; another seed does not
    again = tmp_path / "again.parquet"
    run("corrupt", sample_path, again, "--rate", "0.2", "--seed", "3")
    assert read_table(again).equals(noisy)
    other = tmp_path / "other.parquet"
    run("corrupt", sample_path, other, "--rate", "0.2", "--seed", "4")
    assert not read_table(other)["flipped"].equals(noisy["flipped"])


def test_corrupt_human_summary(tmp_path, sample_path):
    result = run(
        "corrupt",
        sample_path,
        tmp_path / "o.parquet",
        "--noise",
        "asymmetric",
        "--rate-pos",
        "0.3",
        "--rate-neg",
        "0.1",
        "--exact",
    )
    assert result.exit_code == 0
    assert "positive" in result.output and "negative" in result.output and "400 rows" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0.7"], "carry no signal"),
        (["--rate", "-1"], "--rate must be in [0, 1]"),
        (["--noise", "bt", "--temperature", "0"], "--temperature must be > 0"),
        (
            ["--noise", "asymmetric", "--rate-pos", "0.2", "--rate-neg", "0.1", "--by", "column:nope"],
            "no column 'nope'",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line_and_no_output(tmp_path, sample_path, args, message):
    out = tmp_path / "o.parquet"
    result = run("corrupt", sample_path, out, *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_data_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\nhi,there\n")
    result = run("corrupt", bad, tmp_path / "o.parquet", "--rate", "0.1")
    assert result.exit_code == 2
    assert "missing required column(s) 'chosen', 'rejected'; columns are: prompt, answer" in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_corrupt_bt_noise_on_scores(tmp_path, sample_path):
    out = tmp_path / "bt.parquet"
    result = run("corrupt", sample_path, out, "--noise", "bt", "--temperature", "1", "--json")
    summary = json.loads(result.stdout)
    # the expected rate is the mean of σ(−(s_c − s_r)) over the sample, the realized one is near it
    clean = read_table(sample_path)
    margin = (clean["chosen_score"] - clean["rejected_score"]).to_numpy()
    import numpy as np

    expected = float(np.mean(1 / (1 + np.exp(margin))))
    group = summary["groups"]["all"]
    assert group["expected_rate"] == pytest.approx(expected, rel=1e-9)
    assert group["ci95"][0] - 0.02 < expected < group["ci95"][1] + 0.02


def test_inspect_json_shows_schema_stats_and_history(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    run("corrupt", sample_path, out, "--rate", "0.1")
    result = run("inspect", out, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["rows"] == 400
    columns = {c["column"]: c for c in report["columns"]}
    assert columns["flipped"]["true_share"] == pytest.approx(read_table(out)["flipped"].mean())
    assert columns["chosen_features"]["mean_len"] == 16
    assert [h["command"] for h in report["history"]] == ["make_sample", "corrupt"]
    human = run("inspect", out)
    assert human.exit_code == 0 and "history" in human.output and "corrupt" in human.output


def test_real_pipe_through_subprocess(tmp_path, sample_path):
    """`prefnoise corrupt - - < a > b` works in a real shell pipeline."""
    with open(sample_path, "rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "prefnoise", "corrupt", "-", "-", "--rate", "0.25", "--seed", "1", "--json"],
            stdin=stdin,
            capture_output=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"PAR1"
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    out = tmp_path / "piped.parquet"
    out.write_bytes(proc.stdout)
    assert int(read_table(out)["flipped"].sum()) == summary["flips"]
    assert read_history(out)[-1]["input"]["path"] == "<stdin>"
    bad = subprocess.run(
        [sys.executable, "-m", "prefnoise", "corrupt", "missing.parquet", "x.parquet", "--rate", "0.1"],
        capture_output=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.decode() == "Error: missing.parquet: no such file or directory\n"
