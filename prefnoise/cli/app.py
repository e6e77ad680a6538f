"""The typer application object every command module registers on, and its global options."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from prefnoise import __version__
from prefnoise.cli.config_file import is_options_file
from prefnoise.errors import PrefnoiseError

DEBUG_ENV = "PREFNOISE_DEBUG"
QUIET_ENV = "PREFNOISE_QUIET"

# -h works like --help on every command (subcommands inherit it from the group's context)
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="prefnoise",
    context_settings=CONTEXT_SETTINGS,
    help="Inject, measure and survive label noise in preference datasets.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"prefnoise {__version__}")
        raise typer.Exit(0)


@app.callback()
def global_options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On an internal error (exit 3) print the full traceback; may follow any command."),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "-q",
            "--quiet",
            help="No progress bars or reports on stderr (errors and --json still print); may follow any command.",
        ),
    ] = False,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="FILE.yaml",
            help=(
                "Option defaults for the command from a YAML mapping (default < file < flag); may follow any "
                "command. After the command, a value not ending in .yaml/.yml is a hub dataset's config name."
            ),
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Inject, measure and survive label noise in preference datasets.

    Exit codes: 0 ok, 1 a failed gate, 2 bad input or usage, 3 an internal error, 4 audit's rate undetermined,
    130 on Ctrl-C, 143 on SIGTERM (129 on SIGHUP), 141 when the reader of stdout went away.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if quiet:
        os.environ[QUIET_ENV] = "1"
    if config is not None and not is_options_file(config):  # a hub config name here would be silently unused
        raise PrefnoiseError(
            f"--config {config!r} before the command takes a .yaml/.yml options file; a hub dataset's config "
            "name goes after the command (prefnoise COMMAND DATA --config NAME)"
        )
