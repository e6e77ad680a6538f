"""`prefnoise rank-check DATA`: does a learned reward still rank responses like the true one?"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prefnoise import api
from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenScoreColOption,
    ConfigOption,
    EngineOption,
    JsonOption,
    OverwriteOption,
    RayAddressOption,
    RejectedScoreColOption,
    SeedOption,
    SplitOption,
    WorkersOption,
    cli_errors,
    emit_json,
    engine_options,
    input_options,
    one_line,
    options_from,
    progress,
    quiet_requested,
    register_engine,
    register_options,
    safe,
    show_progress,
)
from prefnoise.metrics import DEFAULT_MEMORY_RESPONSES, RankMetrics, RankReport
from prefnoise.options import RankCheckOptions

GATE_FAILED = 1


PredOption = Annotated[str, typer.Option("--pred", help="Predicted reward field (chosen_<f>/rejected_<f>, or <f>).")]
TrueOption = Annotated[
    str | None,
    typer.Option(
        "--true",
        help="True reward field (default 'score'; when that is absent the labels are the reference). "
        "A field named here must exist.",
    ),
]
LongOption = Annotated[bool, typer.Option("--long", help="Treat DATA as a long table (prompt_id, <pred>, <true>).")]
GroupByOption = Annotated[list[str] | None, typer.Option("--group-by", help="Also split the report by this column.")]
BootstrapOption = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% interval.")]
ShowWorstOption = Annotated[int, typer.Option("--show-worst", help="List the K most wrongly ranked pairs.")]
PlotOption = Annotated[str | None, typer.Option("--plot", help="Write a PNG figure here.")]
MinAgreementOption = Annotated[float | None, typer.Option("--min-agreement", help="Fail (exit 1) below this.")]
MinKendallOption = Annotated[float | None, typer.Option("--min-kendall", help="Fail (exit 1) below this.")]
MinPreservationOption = Annotated[float | None, typer.Option("--min-preservation", help="Fail (exit 1) below this.")]
MemoryResponsesOption = Annotated[
    int,
    typer.Option(
        "--memory-responses",
        help="Hold about this many responses in memory at once (1,000,000: ~0.6 GB peak in all); "
        "a larger table is partitioned into temporary files.",
    ),
]
TempDirOption = Annotated[
    Path | None, typer.Option("--temp-dir", help="Directory for the temporary files (default: $TMPDIR).")
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Score DATA (a pair table) with this reward model first: a fit-reward directory, or a "
        "sequence-classification model (num_labels=1) directory or cached hub id.",
        rich_help_panel="Scoring",
    ),
]
ScoringDeviceOption = Annotated[
    str, typer.Option("--device", help="--model: auto (CUDA when present), cpu or cuda.", rich_help_panel="Scoring")
]
ScoringBatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="--model: responses per forward pass.", rich_help_panel="Scoring")
]
ScoringDropInvalidOption = Annotated[
    bool,
    typer.Option(
        "--drop-invalid",
        help="--model: skip rows with empty fields, identical responses or mismatched prefixes instead of failing.",
        rich_help_panel="Scoring",
    ),
]


register_options("rank-check", RankCheckOptions)
register_engine("rank-check")


@app.command("rank-check")
@cli_errors
def rank_check_command(
    source: Annotated[
        str, typer.Argument(metavar="DATA", help="Pair table with predicted rewards, or a long table; - for stdin.")
    ],
    pred: PredOption = RankCheckOptions.pred,
    true: TrueOption = RankCheckOptions.true,
    long: LongOption = RankCheckOptions.long,
    group_by: GroupByOption = None,
    bootstrap: BootstrapOption = RankCheckOptions.bootstrap,
    show_worst: ShowWorstOption = RankCheckOptions.show_worst,
    plot: PlotOption = None,
    min_agreement: MinAgreementOption = RankCheckOptions.min_agreement,
    min_kendall: MinKendallOption = RankCheckOptions.min_kendall,
    min_preservation: MinPreservationOption = RankCheckOptions.min_preservation,
    memory_responses: MemoryResponsesOption = DEFAULT_MEMORY_RESPONSES,
    temp_dir: TempDirOption = RankCheckOptions.temp_dir,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    seed: SeedOption = RankCheckOptions.seed,
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    model: ModelOption = RankCheckOptions.model,
    device: ScoringDeviceOption = RankCheckOptions.device,
    batch_size: ScoringBatchSizeOption = RankCheckOptions.batch_size,
    drop_invalid: ScoringDropInvalidOption = False,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Pairwise agreement, rank preservation, Kendall's tau-b and Spearman's rho of a learned reward."""

    result = api.rank_check(
        source, options_from(RankCheckOptions, locals()), plot=plot,
        overwrite=overwrite, progress_bar=functools.partial(progress, enabled=show_progress(json_output)),
        engine=engine_options(locals()), **input_options(locals()),
    )
    if json_output:
        emit_json(result.summary)
    else:
        _print_report(result.report, source, result.failures)
    if result.failures:
        raise typer.Exit(GATE_FAILED)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


def _metric_rows(metrics: RankMetrics) -> list[tuple[str, str]]:
    a, p = metrics.agreement, metrics.preservation
    interval = "" if a.low is None else f" [{_fmt(a.low)}, {_fmt(a.high)}]"
    return [
        ("pairwise agreement", f"{_fmt(a.value)}{interval}"),
        ("  pairs / true ties / pred ties", f"{_fmt(a.pairs)} / {_fmt(a.true_ties)} / {_fmt(a.pred_ties)}"),
        ("rank preservation", f"{_fmt(p.value)}  ({_fmt(p.preserved)} of {_fmt(p.prompts)} prompts)"),
        ("Kendall tau-b", _fmt(metrics.kendall_tau_b)),
        ("Spearman rho", _fmt(metrics.spearman_rho)),
        ("Kendall tau-b per prompt", _fmt(metrics.kendall_tau_b_per_prompt)),
        ("Spearman rho per prompt", _fmt(metrics.spearman_rho_per_prompt)),
    ]


def _print_report(report: RankReport, source: str, failures: list[str]) -> None:
    # A fixed width off a terminal, so piped and captured reports are not wrapped mid-word. Under -q the
    # report is silent and only the failed gates are told, on stderr (the exit code is 1).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160, quiet=quiet_requested())
    if quiet_requested():
        for failure in failures:
            typer.echo(f"gate failed: {one_line(failure)}", err=True)
    reference = f"true reward '{report.true}'" if report.true else "labels (no true reward found)"
    console.print(
        f"{safe(source)}: {report.layout} table, {report.overall.rows:,} rows, predicted '{safe(report.pred)}' vs "
        f"{safe(reference)}"
        + (
            f"; {report.dropped_rows:,} rows with a missing or non-finite (NaN/inf) reward skipped"
            if report.dropped_rows
            else ""
        )
    )
    if report.note:
        console.print(safe(report.note))
    table = Table(title=f"rank check (95% intervals: {report.interval})", title_justify="left")
    table.add_column("metric")
    table.add_column("all", justify="right")
    columns = [(name, value, m) for name, by in report.splits.items() for value, m in by.items()]
    for name, value, _ in columns:
        table.add_column(safe(f"{name}={value}"), justify="right")
    rows = [_metric_rows(report.overall)] + [_metric_rows(m) for _, _, m in columns]
    for i, (label, _) in enumerate(rows[0]):
        table.add_row(label, *[r[i][1] for r in rows])
    console.print(table)
    if report.worst:
        worst = Table(title="worst-ranked pairs", title_justify="left")
        for key in report.worst[0]:
            worst.add_column(key, justify="left" if key in (C.PAIR_ID, "rows") else "right")
        for row in report.worst:
            worst.add_row(*[_fmt(v) if not isinstance(v, str) else safe(v) for v in row.values()])
        console.print(worst)
    for failure in failures:
        console.print(f"[bold red]gate failed:[/] {failure}")
