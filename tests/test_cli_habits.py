"""CLI habits a TRL user expects: --config FILE.yaml (default < file < flag), -q/--quiet, completion, --version."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prefnoise import __version__
from prefnoise.cli import main
from prefnoise.cli.config_file import hoist_global_options

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "pairs.parquet"


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _clean_quiet_env(monkeypatch):
    # setenv (not delenv) so that monkeypatch restores the variable main() sets for -q
    monkeypatch.setenv("PREFNOISE_QUIET", "0")
    yield
    from prefnoise.cli.common import console

    console.quiet = False


def test_hoisting_moves_only_global_flags_and_options_files() -> None:
    args = ["corrupt", "IN", "OUT", "--rate", "0.2", "-q", "--config", "c.yaml", "--", "-q"]
    assert hoist_global_options(args) == [
        "-q",
        "--config",
        "c.yaml",
        "corrupt",
        "IN",
        "OUT",
        "--rate",
        "0.2",
        "--",
        "-q",
    ]
    # a hub dataset's config name stays with the command
    assert hoist_global_options(["corrupt", "org/x", "O", "--config", "en"]) == [
        "corrupt",
        "org/x",
        "O",
        "--config",
        "en",
    ]


def test_config_file_sits_between_defaults_and_flags(tmp_path: Path, capsys) -> None:
    config = tmp_path / "corrupt.yaml"
    config.write_text("rate: 0.25\nseed: 3\nnoise: symmetric\n")
    code, out, _ = run(capsys, "corrupt", SAMPLE, tmp_path / "a.parquet", "--config", config, "--json")
    from_file = json.loads(out)
    assert code == 0 and from_file["rate"] != 0.0
    code, out, _ = run(capsys, "corrupt", SAMPLE, tmp_path / "b.parquet", "--rate", "0.25", "--seed", "3", "--json")
    assert json.loads(out)["flips"] == from_file["flips"]  # the file's values are exactly the flags' values
    code, out, _ = run(capsys, "corrupt", SAMPLE, tmp_path / "c.parquet", "--config", config, "--rate", "0.1", "--json")
    flag_wins = json.loads(out)
    code, out, _ = run(capsys, "corrupt", SAMPLE, tmp_path / "d.parquet", "--rate", "0.1", "--seed", "3", "--json")
    assert flag_wins["flips"] == json.loads(out)["flips"] and flag_wins["flips"] != from_file["flips"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus: 1\n", "'bogus' is not an option of prefnoise corrupt"),
        ("rate: 0.9\n", "--rate 0.9 flips at least half"),  # values are checked like flags
        ("- 1\n- 2\n", "must map option names to values, got list"),
        ("rate: [\n", "is not valid YAML"),
        ("in: x.parquet\n", "is an argument of prefnoise corrupt"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path: Path, capsys, text: str, fragment: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, out, err = run(capsys, "corrupt", SAMPLE, tmp_path / "o.parquet", "--config", config)
    assert code == 2 and out == "" and err.startswith("Error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert not (tmp_path / "o.parquet").exists()


def test_config_file_reaches_nested_commands(tmp_path: Path, capsys) -> None:
    config = tmp_path / "r.yaml"
    config.write_text("epochs: 7\n")
    code, out, _ = run(capsys, "reproduce", "synthetic", "--help", "--config", config)
    assert code == 0 and "[default: 7]" in out


def test_quiet_prints_nothing_but_results(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "corrupt", SAMPLE, tmp_path / "q.parquet", "--rate", "0.2", "-q")
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "q.parquet").exists()
    code, out, err = run(capsys, "--quiet", "corrupt", SAMPLE, tmp_path / "j.parquet", "--rate", "0.2", "--json")
    assert code == 0 and json.loads(out)["rows"] == 400  # --json output is the result, so it still prints
    code, out, err = run(capsys, "-q", "corrupt", SAMPLE, tmp_path / "e.parquet", "--rate", "0.9")
    assert code == 2 and err.startswith("Error: ")  # errors still print
    assert os.environ.get("PREFNOISE_QUIET") == "1"  # the fixture restores it afterwards


def test_version_and_completion(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"prefnoise {__version__}"
    # typer's --show-completion takes the shell as a value only with detection off; with it on, the
    # script depends on the parent process (shellingham), which differs between a terminal and CI
    import subprocess
    import sys

    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run([sys.executable, "-m", "prefnoise", "--show-completion", "bash"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "_PREFNOISE_COMPLETE" in done.stdout, done.stderr[-600:]
