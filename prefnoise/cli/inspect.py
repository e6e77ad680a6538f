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
    JsonOption,
    LayoutOption,
    PromptColOption,
    RejectedColOption,
    cli_errors,
    emit_json,
    open_input,
)
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
) -> None:
    """Print a table's schema, row count, column statistics and provenance history."""
    src = open_input(source, prompt_col, chosen_col, rejected_col, layout, drop_invalid=True)
    if (
        src.format == "parquet"
        and layout == "auto"
        and (prompt_col, chosen_col, rejected_col) == ("prompt", "chosen", "rejected")
    ):
        src.schema  # validates the first batch: required columns and types  # noqa: B018
        lazy = src.scan_raw()  # statistics stream over the file instead of loading it
    else:
        lazy = src.collect().lazy()
    stats = column_stats(lazy)
    rows = stats and _rows(lazy)
    report = {"file": src.name, "format": src.format, "rows": rows, "columns": stats, "history": src.history}
    if json_output:
        emit_json(report)
        return
    _print_report(report)


def _rows(lazy: pl.LazyFrame) -> int:
    return int(lazy.select(pl.len()).collect(engine="streaming").item())


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_report(report: dict) -> None:
    console = Console(highlight=False)
    console.print(f"{report['file']}  ({report['format']}, {report['rows']:,} rows)")
    table = Table(title="columns", title_justify="left")
    for header in ("column", "dtype", "nulls", "summary"):
        table.add_column(header, justify="right" if header == "nulls" else "left")
    for col in report["columns"]:
        summary = ", ".join(
            f"{key}={_fmt(value)}" for key, value in col.items() if key not in ("column", "dtype", "nulls")
        )
        table.add_row(col["column"], col["dtype"], _fmt(col.get("nulls")), summary)
    console.print(table)
    if not report["history"]:
        console.print("history: none (not written by prefnoise)")
        return
    history = Table(title="history", title_justify="left")
    for header in ("#", "command", "when", "seed", "rows in → out", "parameters"):
        history.add_column(header)
    for i, step in enumerate(report["history"], 1):
        rows_in = (step.get("input") or {}).get("rows")
        history.add_row(
            str(i),
            step.get("command", "?"),
            str(step.get("time", "")),
            str(step.get("seed", "")),
            f"{_fmt(rows_in)} → {_fmt(step.get('rows_out'))}",
            json.dumps(step.get("parameters", {}), default=str),
        )
    console.print(history)
