"""Command-line interface: a thin layer that parses options, calls the library and prints."""

from __future__ import annotations

# Each import registers its subcommand on `app`.
from prefnoise.cli import (
    align,  # noqa: E402,F401
    audit,  # noqa: E402,F401
    corrupt,  # noqa: E402,F401
    fit_reward,  # noqa: E402,F401
    inspect,  # noqa: E402,F401
    rank_check,  # noqa: E402,F401
    reproduce,  # noqa: E402,F401
    score,  # noqa: E402,F401
)
from prefnoise.cli.app import app


def main() -> None:
    """Entry point of the `prefnoise` console script."""
    app()


__all__ = ["app", "main"]
