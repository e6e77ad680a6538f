"""The typer application object every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="prefnoise",
    help="Inject, measure and survive label noise in preference datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
