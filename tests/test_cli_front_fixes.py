"""Fixes of the CLI front found as a new user: rank-check --drop-invalid, -q quiets rank-check's report,
progress bars readable at 80 columns, pn.reproduce equal to `reproduce ... --json`, dir(pn) before use."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import polars as pl
import pytest
from rich.console import Console
from rich.progress import Progress

import prefnoise as pn
from prefnoise.cli import main
from prefnoise.cli.common import PROGRESS_BAR_WIDTH, progress_columns
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import make_feature_pairs
from tests.test_cli_rank_check import scored_table


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A small mlp reward model written by the CLI, and the feature pairs it was fitted on."""
    root = tmp_path_factory.mktemp("front")
    make_feature_pairs(60, seed=2).write_parquet(root / "features.parquet")
    result = invoke("fit-reward", root / "features.parquet", "--out", root / "rm", "--epochs", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    return root / "rm"


def test_rank_check_with_a_model_takes_the_drop_invalid_it_advises(reward_dir, tmp_path):
    frame = make_feature_pairs(30, seed=5)
    bad = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected")
    )
    path = tmp_path / "bad.parquet"
    bad.write_parquet(path)
    refused = invoke("rank-check", path, "--model", reward_dir, "--bootstrap", "20")
    assert_one_line_error(refused, "1 row(s) with 'chosen' equals 'rejected'", "pass --drop-invalid")
    done = invoke("rank-check", path, "--model", reward_dir, "--bootstrap", "20", "--drop-invalid", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["overall"]["rows"] == 29  # the one invalid row skipped
    alone = invoke("rank-check", scored_table(tmp_path / "s.parquet"), "--drop-invalid")
    assert_one_line_error(alone, "--drop-invalid options apply with --model only")


def _main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


@pytest.fixture
def _clean_quiet_env(monkeypatch):
    monkeypatch.setenv("PREFNOISE_QUIET", "0")  # restored after main() sets it for -q
    yield


def test_quiet_silences_rank_checks_report_but_not_its_failed_gates(tmp_path, capsys, _clean_quiet_env):
    data = scored_table(tmp_path / "d.parquet")
    code, out, err = _main(capsys, "rank-check", data, "--bootstrap", "50")
    assert code == 0 and "pairwise agreement" in out  # without -q: the report
    code, out, err = _main(capsys, "rank-check", data, "--bootstrap", "50", "-q")
    assert code == 0 and out == "" and err == ""
    code, out, err = _main(capsys, "-q", "rank-check", data, "--bootstrap", "50", "--min-kendall", "0.99")
    assert code == 1 and out == ""
    assert err.startswith("gate failed: kendall_tau_b ") and err.strip().endswith("< 0.99") and err.count("\n") == 1
    code, out, err = _main(capsys, "-q", "inspect", data)
    assert code == 0 and out == ""


def test_progress_bars_stay_on_one_legible_line_at_80_columns():
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system="standard")
    bar = Progress(*progress_columns(), console=console, auto_refresh=False)
    for name, done, total in (("embedding", 456_789, 1_234_567), ("rank-check %", 50, 100), ("corrupting", 7, None)):
        task = bar.add_task(name, total=total)
        bar.advance(task, done)
    console.print(bar.get_renderable())
    lines = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue()).rstrip("\n").split("\n")  # without colours
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("embedding") and "456789/1234567" in lines[0]
    assert "50/100" in lines[1] and "7/?" in lines[2]
    bar_cells = sum(lines[0].count(c) for c in "━╸╺")
    assert bar_cells == PROGRESS_BAR_WIDTH == 20  # the bar keeps its width instead of collapsing


def test_dir_lists_the_api_before_first_use_without_loading_it():
    code = (
        "import sys, prefnoise as pn; names = dir(pn); "
        "print(all(n in names for n in ('corrupt', 'reproduce', 'rank_check', 'CorruptOptions', 'corrupt_frame')), "
        "'prefnoise.api' in sys.modules, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False", "False"], done.stderr[-600:]
    assert "reproduce" in pn.__all__ and callable(pn.reproduce) and "ReproduceResult" in dir(pn)


def test_reproduce_in_python_equals_the_cli_json(tmp_path):
    grid = {"seeds": "1", "epochs": "1", "train_pairs": "50", "test_pairs": "20", "losses": "logistic,ramp",
            "rates": "0,0.4", "noise": "symmetric", "device": "cpu"}
    flags = [x for k, v in grid.items() for x in ("--" + k.replace("_", "-"), v)]
    cli = invoke("reproduce", "synthetic", "--out", tmp_path / "grid", *flags, "--json")
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.stdout)
    result = pn.reproduce("synthetic", seeds=1, epochs=1, train_pairs=50, test_pairs=20, losses="logistic,ramp",
                          rates=(0.0, 0.4), noise=["symmetric"], device="cpu")
    got = json.loads(json.dumps(result.summary))
    assert got.pop("output") is None and expected.pop("output") == str(tmp_path / "grid")
    assert expected.pop("schema_version") == 1  # the CLI adds it to every --json object
    assert got == expected and got["cells"] == result.results.height == 4  # 1 kind x 2 rates x 2 losses x 1 seed
    written = sorted(p.name for p in (tmp_path / "grid").iterdir() if not p.name.startswith("."))
    assert written == ["results.md", "results.parquet", "robustness.png"]
    assert "pn.reproduce" not in (tmp_path / "grid" / "results.md").read_text()


def test_reproduce_refuses_unknown_experiments_and_options():
    with pytest.raises(pn.PrefnoiseError, match="unknown experiment 'mnist'; choose one of: synthetic, alignment"):
        pn.reproduce("mnist")
    with pytest.raises(TypeError, match="pairs"):
        pn.reproduce("synthetic", pairs=100)  # an alignment option
    with pytest.raises(pn.OptionError, match=r"^seeds= must be >= 1, got 0"):
        pn.reproduce("alignment", seeds=0)
