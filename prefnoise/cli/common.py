"""What every subcommand shares: one-line errors, progress bars, JSON and console output."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from prefnoise.data import ColumnMap, PreferenceSource, open_source
from prefnoise.errors import PrefnoiseError

F = TypeVar("F", bound=Callable[..., Any])

# Human-facing output goes to stderr so stdout stays clean for Parquet or JSON in pipes.
console = Console(stderr=True, highlight=False)


def cli_errors(command: F) -> F:
    """Turn a PrefnoiseError raised by ``command`` into one line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrefnoiseError as error:
            typer.echo(f"Error: {error.message}", err=True)
            raise typer.Exit(error.exit_code) from None
        except BrokenPipeError:
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; no output was written.", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def show_progress(json_output: bool) -> bool:
    """Whether to draw a progress bar: only for a person at a terminal, never with --json."""
    return not json_output and sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: int | None, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback drawing a rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def emit_json(payload: dict[str, Any], *, to_stderr: bool = False) -> None:
    """Print ``payload`` as one JSON object (stdout, or stderr when stdout carries data)."""
    text = json.dumps(payload, default=str)
    stream = sys.stderr if to_stderr else sys.stdout
    stream.write(text + "\n")
    stream.flush()


# --------------------------------------------------------------------------- shared options
# Reused by every command that reads a preference table, so the flags are spelled once.

PromptColOption = Annotated[
    str, typer.Option("--prompt-col", help="Input column holding the prompt.", rich_help_panel="Input")
]
ChosenColOption = Annotated[
    str, typer.Option("--chosen-col", help="Input column holding the preferred response.", rich_help_panel="Input")
]
RejectedColOption = Annotated[
    str, typer.Option("--rejected-col", help="Input column holding the other response.", rich_help_panel="Input")
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
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]


def open_input(
    source: str,
    prompt_col: str = "prompt",
    chosen_col: str = "chosen",
    rejected_col: str = "rejected",
    layout: str = "auto",
    drop_invalid: bool = False,
) -> PreferenceSource:
    """Open a preference table from the shared input options."""
    columns = ColumnMap(prompt=prompt_col, chosen=chosen_col, rejected=rejected_col)
    return open_source(source, columns=columns, layout=layout, drop_invalid=drop_invalid)
