"""What the safety tests share: run a command in-process and check the one-line error contract."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from prefnoise.cli import app


def invoke(*args):
    """Run ``prefnoise ARGS...`` in-process; the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, stderr exactly one line 'Error: …' holding every fragment; the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr.strip()


def assert_nothing_written(out: Path) -> None:
    """No output and no hidden temporary (.OUT.tmp-*) beside it."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
