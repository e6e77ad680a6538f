"""What every subcommand shares: one-line errors, progress bars, JSON and console output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from prefnoise.atomic import remove_temporary_files, user_umask
from prefnoise.cli.app import DEBUG_ENV
from prefnoise.cli.streams import check_utf8_names, printable_name
from prefnoise.engine.session import RAY_OUTPUT
from prefnoise.errors import PrefnoiseError, PrefnoiseWarning
from prefnoise.jsonvalues import strict_json_value
from prefnoise.options import OPTION_RANGES, SEED_MAX, OptionError, Options, check_options  # noqa: F401  (re-exported for the CLI modules)
from prefnoise.options.engine import ENGINES, EngineOptions
from prefnoise.outputs import release_claims
from prefnoise.resources import resource_limit_message

F = TypeVar("F", bound=Callable[..., Any])

# A command's report (its result for a person) goes to stdout, like rank-check's and inspect's; a
# command whose stdout carries data (OUT is -) calls reports_to_stderr() first. Progress bars go to
# stderr always (log_console). -q silences both; errors and --json are printed without them.
console = Console(highlight=False, soft_wrap=True)  # a report line is one line, also in a pipe
log_console = Console(stderr=True, highlight=False)


def reports_to_stderr(data_on_stdout: bool = True) -> None:
    """Send this command's report to stderr when stdout carries its data (an output of ``-``)."""
    console.stderr = data_on_stdout


def quiet_requested() -> bool:
    """Whether ``-q/--quiet`` was given (no progress bars, no reports)."""
    return os.environ.get("PREFNOISE_QUIET", "") not in ("", "0")

# The exit-code contract (README, "Errors and exit codes").
EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as for a program the shell sees killed by SIGPIPE
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so every ``finally`` and context manager cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def debug_enabled() -> bool:
    """Whether ``--debug`` (or ``PREFNOISE_DEBUG=1``) asked for tracebacks of internal errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
    """``text`` as a single printable line: newlines and control characters (terminal escapes) shown escaped."""
    text = " | ".join(part.strip() for part in printable_name(str(text)).strip().splitlines() if part.strip())
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe(value: object) -> str:
    """``value`` for a rich console: one printable line, its rich markup escaped (data is never markup)."""
    return escape(one_line(str(value)))


def fail(message: str, code: int) -> typer.Exit:
    """Print ``Error: message`` as one line on stderr; return the Exit to raise."""
    typer.echo(f"Error: {one_line(message)}", err=True)
    return typer.Exit(code)


def os_error_message(error: OSError) -> str:
    """A one-line description of an OS-level failure (disk full, permission denied, ...) naming the path."""
    limit = resource_limit_message(error)
    if limit is not None:
        return limit
    reason = error.strerror or str(error) or type(error).__name__
    where = error.filename if error.filename is not None else None
    if where is None:
        return f"{reason}; check the disk space and permissions of the output location"
    return f"{where}: {reason}"


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` for the block (main thread only).

    The exception unwinds like Ctrl-C does, so temporary files, spill buckets and half-written
    outputs are removed. A second signal during that cleanup is ignored so the cleanup completes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again (EPIPE, ENOSPC)."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def flush_stdout() -> None:
    """Flush stdout, raising a one-line PrefnoiseError when it cannot take the output (e.g. /dev/full)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        silence_stdout()
        raise PrefnoiseError(f"cannot write to standard output: {error.strerror or error}") from None


def cli_errors(command: F) -> F:
    """Run ``command`` under the exit-code contract.

    Each command's options object checks its options once (an OptionError names the flag). A
    PrefnoiseError or an OS error is one line on stderr and exit 2 (or the error's code); Ctrl-C exits
    130 and SIGTERM/SIGHUP 143/129 after the same cleanup; anything unexpected is one line "internal
    error: ..." and exit 3, with the traceback only under ``--debug``.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user_umask()  # read once, before any writer thread starts
        console.stderr = False  # reports to stdout unless the command's data goes there
        console.quiet = log_console.quiet = quiet_requested()
        try:
            with signals_as_exceptions(), prefnoise_warnings_on_stderr():
                check_utf8_names(kwargs)
                result = command(*args, **kwargs)
                flush_stdout()
                return result
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except OptionError as error:
            raise fail(error.as_flag(), error.exit_code) from None
        except PrefnoiseError as error:
            raise fail(error.message, error.exit_code) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except SystemExit as error:
            if isinstance(error.__context__, BrokenPipeError):  # rich's consoles exit 1 on a broken pipe
                silence_stdout()
                raise typer.Exit(EXIT_BROKEN_PIPE) from None
            raise
        except OSError as error:
            raise fail(os_error_message(error), EXIT_BAD_INPUT) from None
        except KeyboardInterrupt as error:
            typer.echo(f"Interrupted; {getattr(error, 'prefnoise_note', NOTHING_WRITTEN)}", err=True)
            raise typer.Exit(130) from None
        except Terminated as error:
            typer.echo(f"Terminated ({error}); {getattr(error, 'prefnoise_note', NOTHING_WRITTEN)}", err=True)
            raise typer.Exit(128 + error.signum) from None
        except Exception as error:
            limit = resource_limit_message(error)  # out of memory, a thread limit, the file-size limit
            if limit is not None:
                raise fail(limit, EXIT_BAD_INPUT) from None
            if debug_enabled():
                traceback.print_exc()
            reason = one_line(f"{type(error).__name__}: {error}")
            typer.echo(f"internal error: {reason} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None
        finally:
            remove_temporary_files()
            release_claims()

    return wrapper  # type: ignore[return-value]


NOTHING_WRITTEN = "no output was written."


@contextlib.contextmanager
def prefnoise_warnings_on_stderr() -> Iterator[None]:
    """Print every :class:`PrefnoiseWarning` raised in the block as one ``Warning: ...`` line on stderr
    (each time it is raised); other warnings (torch, transformers) and Ray's own log lines (--engine ray)
    only under ``--debug``, as their libraries show them: they would break the one-line rule of errors."""
    token = RAY_OUTPUT.set(debug_enabled())
    with warnings.catch_warnings():
        if not debug_enabled():
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", PrefnoiseWarning)
        show = warnings.showwarning

        def print_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, PrefnoiseWarning):
                typer.echo(one_line(f"Warning: {message}"), err=True)
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = print_warning
        try:
            yield
        finally:
            RAY_OUTPUT.reset(token)


# --------------------------------------------------------------------------- option validation

def show_progress(json_output: bool) -> bool:
    """Whether to draw a progress bar: only for a person at a terminal, never with --json."""
    return not json_output and sys.stderr.isatty() and not quiet_requested()


# A fixed bar width: at 80 columns the bar, counts and times stay on one line, legible (rich would
# otherwise squeeze the bar to nothing or wrap when a column grows).
PROGRESS_BAR_WIDTH = 20


def progress_columns(*extra: ProgressColumn) -> tuple[ProgressColumn, ...]:
    """The columns of every progress bar: description, a fixed-width bar, done/total, elapsed, ETA, then ``extra``."""
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=PROGRESS_BAR_WIDTH),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra,
    )


@contextlib.contextmanager
def progress(description: str, total: int | None, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback drawing a rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    bar = Progress(*progress_columns(), console=log_console, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


OptionsT = TypeVar("OptionsT", bound=Options)

# Command path ("corrupt", "reproduce synthetic") -> the options class its flags build. Every field of the
# class is a flag of the same name and every flag a field, but for the CLI's own (tests/test_options_front.py).
COMMAND_OPTIONS: dict[str, type[Options]] = {}


def register_options(command: str, cls: type[OptionsT]) -> type[OptionsT]:
    """Record that ``command``'s flags build ``cls`` (checked by the flag/field parity test); return ``cls``."""
    COMMAND_OPTIONS[command] = cls
    return cls


def options_from(cls: type[OptionsT], values: dict[str, Any]) -> OptionsT:
    """``cls`` built from a command's parameters (``locals()``): every field has a flag of the same name."""
    return cls(**{item.name: values[item.name] for item in dataclasses.fields(cls)})


# Commands that take the engine flags (--engine, --ray-address, --workers: EngineOptions's fields) beside
# their own options object; the flag/field parity test counts those flags as EngineOptions's.
ENGINE_COMMANDS: set[str] = set()


def register_engine(command: str) -> None:
    """Record that ``command`` takes the engine flags (EngineOptions), for the flag/field parity test."""
    ENGINE_COMMANDS.add(command)


def engine_options(values: dict[str, Any]) -> EngineOptions:
    """The EngineOptions of a command's parameters (``locals()`` with ``engine``, ``ray_address``, ``workers``)."""
    return options_from(EngineOptions, values)


# The version of every --json object's shape (docs/schemas/<command>.json); raise it on a breaking change.
JSON_SCHEMA_VERSION = 1


def emit_json(payload: dict[str, Any], *, to_stderr: bool = False) -> None:
    """Print ``payload`` as one strict JSON object (NaN/inf as null) with its ``schema_version``, on stdout,
    or stderr when stdout carries data."""
    versioned = {"schema_version": JSON_SCHEMA_VERSION, **payload}
    text = json.dumps(strict_json_value(versioned), default=str, allow_nan=False)
    stream = sys.stderr if to_stderr else sys.stdout
    stream.write(text + "\n")
    stream.flush()


# --------------------------------------------------------------------------- shared options
# Reused by every command that reads a preference table, so the flags are spelled once.

PromptColOption = Annotated[
    str,
    typer.Option(
        "--prompt-col", help="Input column (or dotted path into a struct) holding the prompt.", rich_help_panel="Input"
    ),
]
ChosenColOption = Annotated[
    str,
    typer.Option(
        "--chosen-col",
        help="Input column (or dotted path into a struct) holding the preferred response.",
        rich_help_panel="Input",
    ),
]
RejectedColOption = Annotated[
    str,
    typer.Option(
        "--rejected-col",
        help="Input column (or dotted path into a struct) holding the other response.",
        rich_help_panel="Input",
    ),
]
ChosenScoreColOption = Annotated[
    str | None,
    typer.Option(
        "--chosen-score-col",
        help="Column or dotted path (e.g. metadata.score_chosen) with the chosen response's true score; "
        "becomes chosen_score. Give --rejected-score-col too.",
        rich_help_panel="Input",
    ),
]
RejectedScoreColOption = Annotated[
    str | None,
    typer.Option(
        "--rejected-score-col",
        help="Column or dotted path (e.g. metadata.score_rejected) with the rejected response's true score; "
        "becomes rejected_score.",
        rich_help_panel="Input",
    ),
]
SplitOption = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="Split of a hub dataset id, hub-layout directory or saved DatasetDict (needed when it has several).",
        rich_help_panel="Input",
    ),
]
ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Config (subset) of a hub dataset id or hub-layout directory (needed when it has several).",
        rich_help_panel="Input",
    ),
]
LayoutOption = Annotated[
    str,
    typer.Option(
        "--layout",
        help="'auto' (canonical or TRL conversational) or 'hh' (split full transcripts at the last "
        "'\\n\\nAssistant:' into prompt and responses).",
        rich_help_panel="Input",
    ),
]
DropInvalidOption = Annotated[
    bool,
    typer.Option(
        "--drop-invalid",
        help="Skip rows with empty fields, identical responses or mismatched prefixes instead of failing.",
        rich_help_panel="Input",
    ),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output that prefnoise wrote earlier (never a file or directory it did not write).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", help="Responses per forward pass.")]
InputArgument = Annotated[
    str,
    typer.Argument(
        metavar="IN",
        help="Input table (Parquet, JSONL, CSV, saved or hub-layout dataset dir, cached hub id, or - for stdin).",
    ),
]
OutArgument = Annotated[
    str, typer.Argument(metavar="OUT", help="Output .parquet (or no extension), .jsonl or .csv; - for stdout.")
]
PairsArgument = Annotated[
    str, typer.Argument(metavar="DATA", help="Preference table (Parquet, JSONL, CSV, saved dataset, or -).")
]
# The engine flags (EngineOptions), spelled once for every command that can run on Ray.
EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help=f"Where the work runs: {', '.join(ENGINES)} (ray: Ray Data on a local or joined cluster; "
        "needs pip install 'prefnoise[ray]'; docs/distributed.md).",
        rich_help_panel="Engine",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="--engine ray: join this running cluster (auto, ray://HOST:10001, HOST:6379) instead of "
        "starting a local one.",
        rich_help_panel="Engine",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="--engine ray: CPU slots of the local cluster, and at most that many blocks at once "
        "(default: every CPU).",
        rich_help_panel="Engine",
    ),
]
# The reward-model options fit-reward and audit's fold models share.
RewardModelOption = Annotated[
    str | None,
    typer.Option("--model", help="mlp (default with feature columns), embed+mlp, or a local HF model directory."),
]
EncoderOption = Annotated[str | None, typer.Option("--encoder", help="embed+mlp: local HF encoder directory.")]
HiddenOption = Annotated[int, typer.Option("--hidden", help="MLP hidden width.")]


# The input options every table-reading command shares (the parameters of open_input); the rest of a
# command's parameters are its options object's fields, its arguments and the CLI's own flags.
INPUT_OPTIONS = (
    "prompt_col",
    "chosen_col",
    "rejected_col",
    "layout",
    "drop_invalid",
    "chosen_score_col",
    "rejected_score_col",
    "split",
    "config",
)


def input_options(values: dict[str, Any]) -> dict[str, Any]:
    """The input options among a command's parameters (``locals()``)."""
    return {name: values[name] for name in INPUT_OPTIONS if name in values}

