"""`prefnoise inspect FILE`: schema, row count, column statistics and provenance history."""

from __future__ import annotations

import json
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    JsonOption,
    LayoutOption,
    PromptColOption,
    RejectedColOption,
    RejectedScoreColOption,
    SplitOption,
    cli_errors,
    emit_json,
    one_line,
    quiet_requested,
)
from prefnoise.data import open_input
from prefnoise.describe import column_stats


@app.command("inspect")
@cli_errors
def inspect_command(
    source: Annotated[str, typer.Argument(metavar="FILE", help="Table to describe (any readable format, or -).")],
    json_output: JsonOption = False,
    prompt_col: PromptColOption = "prompt",
    chosen_col: ChosenColOption = "chosen",
    rejected_col: RejectedColOption = "rejected",
    layout: LayoutOption = "auto",
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
) -> None:
    """Print a table's schema, row count, column statistics and provenance history."""
    src = open_input(
        source, prompt_col, chosen_col, rejected_col, layout, drop_invalid=True, warn_history=False,
        chosen_score_col=chosen_score_col, rejected_score_col=rejected_score_col, split=split, config=config,
    )
    # One rule for every format: the table as stored (rows counts every stored row), unless the options
    # map or split columns, which describe the canonical table of the valid rows (invalid ones counted).
    as_stored = layout == "auto" and (prompt_col, chosen_col, rejected_col) == ("prompt", "chosen", "rejected")
    if as_stored:
        src.schema  # validates the first batch: required columns and types  # noqa: B018
        lazy = src.scan_raw()  # Parquet and CSV statistics stream over the file instead of loading it
    else:
        lazy = src.collect().lazy()
    stats = column_stats(lazy)
    rows = stats and (_rows(lazy) if as_stored else src.rows_read)
    report = {
        "input": src.name,
        "format": src.format,
        "rows": rows,
        "invalid_rows": None if as_stored else dict(src.dropped),
        "columns": stats,
        "history": src.history,
        "history_error": getattr(src, "history_error", None),
    }
    if json_output:
        emit_json(report)
        return
    _print_report(report)


def _rows(lazy: pl.LazyFrame) -> int:
    return int(lazy.select(pl.len()).collect(engine="streaming").item())


def _fmt(value: object) -> str:
    """A cell: numbers with separators, any text as one printable line (no terminal escapes)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return one_line(str(value))


def _print_report(report: dict) -> None:
    # markup=False: column names and metadata are data, never rich markup or terminal control
    console = Console(highlight=False, markup=False, emoji=False, quiet=quiet_requested())
    invalid = sum((report["invalid_rows"] or {}).values())
    left_out = f"; {_fmt(invalid)} invalid, left out of the statistics" if invalid else ""
    console.print(f"{_fmt(report['input'])}  ({report['format']}, {_fmt(report['rows'])} rows{left_out})")
    table = Table(title="columns", title_justify="left")
    for header in ("column", "dtype", "nulls", "summary"):
        table.add_column(header, justify="right" if header == "nulls" else "left")
    for col in report["columns"]:
        summary = ", ".join(
            f"{_fmt(key)}={_fmt(value)}" for key, value in col.items() if key not in ("column", "dtype", "nulls")
        )
        table.add_row(_fmt(col["column"]), _fmt(col["dtype"]), _fmt(col.get("nulls")), summary)
    console.print(table)
    history = [step for step in report["history"] if isinstance(step, dict)]
    if report.get("history_error"):
        console.print(f"history: unreadable ({_fmt(report['history_error'])}); the file's provenance is ignored")
        return
    if not history and report["format"] in ("json", "csv"):
        console.print("history: none (JSON lines and CSV files carry no provenance; prefnoise records it in Parquet)")
        return
    if not history:
        console.print("history: none (not written by prefnoise)")
        return
    view = Table(title="history", title_justify="left")
    for header in ("#", "command", "when", "seed", "rows in → out", "parameters"):
        view.add_column(header)
    for i, step in enumerate(history, 1):
        source = step.get("input")
        rows_in = source.get("rows") if isinstance(source, dict) else None
        view.add_row(
            str(i),
            _fmt(step.get("command", "?")),
            _fmt(step.get("time", "")),
            _fmt(str(step.get("seed", ""))),  # an id, not a quantity: no thousands separators
            f"{_fmt(rows_in)} → {_fmt(step.get('rows_out'))}",
            _fmt(json.dumps(step.get("parameters", {}), default=str)),
        )
    console.print(view)
