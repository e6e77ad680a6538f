"""The exit-code contract: 0 ok, 1 a failed gate, 2 bad input (one line), 3 an internal error (one line),
141 when stdout's reader leaves; strict JSON; data never reaches the terminal as escapes or markup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app, main
from prefnoise.cli.common import one_line, strict_json_value
from prefnoise.data import write_table

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "prefnoise", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, **kwargs)


@pytest.fixture
def scored(tmp_path, sample_path) -> Path:
    frame = pl.read_parquet(sample_path)
    path = tmp_path / "scored.parquet"
    write_table(frame.with_columns(chosen_reward=pl.col("chosen_score"), rejected_reward=pl.col("chosen_score") * 0),
                path)
    return path


def test_an_internal_error_is_one_line_and_exit_3(monkeypatch, tmp_path, sample_path):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nwith two lines")

    monkeypatch.setattr("prefnoise.api.corrupting.corrupt_batches", broken)  # what prefnoise.api.corrupt calls
    result = runner.invoke(app, ["corrupt", str(sample_path), str(tmp_path / "o.parquet"), "--rate", "0.2"])
    assert result.exit_code == 3
    assert result.stderr == (
        "internal error: ZeroDivisionError: a bug | with two lines (rerun with --debug for the traceback)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_prints_the_traceback(monkeypatch, capsys, tmp_path, sample_path, where):
    monkeypatch.delenv("PREFNOISE_DEBUG", raising=False)
    if where == "env":
        monkeypatch.setenv("PREFNOISE_DEBUG", "1")
    monkeypatch.setattr("prefnoise.api.corrupting.corrupt_batches", lambda *a, **k: 1 / 0)
    args = ["corrupt", str(sample_path), str(tmp_path / "o.parquet"), "--rate", "0.2"]
    with pytest.raises(SystemExit) as stop:
        main({"before": ["--debug", *args], "after": [*args, "--debug"], "env": args}[where])
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("internal error: ZeroDivisionError")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["corrupt"], "Error: Missing argument 'IN'. (see 'prefnoise corrupt --help')"),
        (["corrupt", "a", "b", "--bogus"], "Error: No such option: --bogus (see 'prefnoise corrupt --help')"),
        (["corrupt", "a", "b", "--rate", "abc"], "Error: Invalid value for '--rate'"),
        (["nope"], "Error: No such command 'nope'."),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_version():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("prefnoise 0.")


def test_a_failed_gate_is_exit_1_and_bad_input_exit_2(scored, tmp_path):
    passed = runner.invoke(app, ["rank-check", str(scored), "--min-agreement", "0.0", "--bootstrap", "0"])
    failed = runner.invoke(app, ["rank-check", str(scored), "--min-agreement", "1.0", "--bootstrap", "0"])
    missing = runner.invoke(app, ["rank-check", str(tmp_path / "missing.parquet")])
    assert (passed.exit_code, failed.exit_code, missing.exit_code) == (0, 1, 2)
    assert "gate failed" in failed.output


def test_a_closed_pipe_is_exit_141_without_a_traceback(sample_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "prefnoise", "corrupt", str(sample_path), "-", "--rate", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head -c 0`: the reader is gone before the first byte
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_json_is_strict_null_never_nan(tmp_path):
    # every true score ties: Kendall's tau-b and Spearman's rho are undefined
    frame = pl.DataFrame({
        "prompt": ["p"] * 4, "chosen": ["a", "b", "c", "d"], "rejected": ["e", "f", "g", "h"],
        "chosen_score": [1.0] * 4, "rejected_score": [1.0] * 4,
        "chosen_reward": [1.0, 2.0, 3.0, 4.0], "rejected_reward": [0.0, 0.0, 0.0, 0.0],
    })
    path = tmp_path / "ties.parquet"
    write_table(frame, path)
    result = runner.invoke(app, ["rank-check", str(path), "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["overall"]["kendall_tau_b"] is None


def test_strict_json_value_by_hand():
    import numpy as np

    value = {"a": float("nan"), "b": [1.5, float("inf"), np.float32("nan"), np.int64(3)], "c": (True, None, "x")}
    assert strict_json_value(value) == {"a": None, "b": [1.5, None, None, 3], "c": [True, None, "x"]}


def test_one_line_escapes_control_characters():
    assert one_line("a\nb\x1b[31mred\x07") == "a | b\\x1b[31mred\\x07"


def test_inspect_shows_hostile_names_and_metadata_escaped(tmp_path):
    escape = "\x1b[2J\x1b[31m"
    frame = pa.table({
        "prompt": ["p"], "chosen": ["a"], "rejected": ["b"],
        f"{escape}col[bold red]x[/]": ["[link=file:///etc/passwd]v[/link]"],
    })
    history = {"format": 1, "history": [{"command": f"corrupt{escape}[blink]", "parameters": {"k": escape}}]}
    path = tmp_path / "hostile.parquet"
    pq.write_table(frame.replace_schema_metadata({b"prefnoise": json.dumps(history)}), path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-m", "prefnoise", "inspect", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b[2J" in done.stdout and "[bold red]x[/]" in done.stdout and "[blink]" in done.stdout

    history["history"][0]["input"] = "not an object"  # malformed provenance: shown as such, never a crash
    pq.write_table(frame.replace_schema_metadata({b"prefnoise": json.dumps(history)}), path)
    done = subprocess.run([sys.executable, "-m", "prefnoise", "inspect", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "history: unreadable (" in done.stdout
