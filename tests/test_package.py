"""The package surface: lazy top-level names, light imports, every subcommand registered."""

from __future__ import annotations

import subprocess
import sys

import pytest

import prefnoise


def test_top_level_names_resolve_lazily():
    assert prefnoise.read_table.__module__ == "prefnoise.data.read"
    assert prefnoise.NoiseSpec.__module__ == "prefnoise.noise"
    assert prefnoise.rank_report.__module__ == "prefnoise.metrics.report"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        prefnoise.nope  # noqa: B018


def test_import_and_cli_help_do_not_load_torch():
    code = (
        "import sys, prefnoise, prefnoise.data, prefnoise.noise\n"
        "from prefnoise.cli import app\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_every_subcommand_is_registered():
    from typer.testing import CliRunner

    from prefnoise.cli import app

    result = CliRunner().invoke(app, ["--help"])
    for command in ("corrupt", "inspect", "fit-reward", "score", "rank-check", "align", "audit", "reproduce"):
        assert command in result.output, command
