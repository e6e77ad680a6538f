"""Command-line interface: a thin layer that parses options, calls the library and prints."""

from __future__ import annotations

import os
import sys

import typer

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
    split,  # noqa: E402,F401
)
from prefnoise.cli.app import DEBUG_ENV, QUIET_ENV, app
from prefnoise.cli.common import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, fail, flush_stdout, silence_stdout
from prefnoise.cli.config_file import config_defaults, hoist_global_options, is_options_file
from prefnoise.cli.streams import guard_standard_streams


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `prefnoise` console script: every failure is one line and a documented exit code."""
    from prefnoise.errors import PrefnoiseError

    guard_standard_streams()
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        os.environ[DEBUG_ENV] = "1"  # before anything can fail, not only once the root callback runs
    if "-q" in args[:end] or "--quiet" in args[:end]:
        os.environ[QUIET_ENV] = "1"  # read by every command before it prints
    try:
        extra = {}
        files = [args[i + 1] for i in range(end - 1) if args[i] == "--config" and is_options_file(args[i + 1])]
        if files:
            extra["default_map"] = config_defaults(command, args, files[-1])
        code = command.main(args=args, prog_name="prefnoise", standalone_mode=False, **extra)
        flush_stdout()
    except typer.Abort:
        code = 130
    except typer.TyperException as error:  # click's usage errors (typer vendors click)
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()
            code = EXIT_BAD_INPUT
        else:
            ctx = getattr(error, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            code = fail(f"{error.format_message()}{hint}", getattr(error, "exit_code", EXIT_BAD_INPUT)).exit_code
    except PrefnoiseError as error:  # stdout could not be flushed
        code = fail(error.message, error.exit_code).exit_code
    except BrokenPipeError:  # the reader went away (| head): as documented, 141
        silence_stdout()
        code = EXIT_BROKEN_PIPE
    sys.exit(code or 0)


__all__ = ["app", "main"]
