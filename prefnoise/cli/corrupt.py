"""`prefnoise corrupt IN OUT`: inject controlled label noise."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.table import Table

from prefnoise import api
from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    DropInvalidOption,
    EngineOption,
    InputArgument,
    JsonOption,
    LayoutOption,
    OutArgument,
    OverwriteOption,
    PromptColOption,
    RayAddressOption,
    RejectedColOption,
    RejectedScoreColOption,
    SeedOption,
    SplitOption,
    WorkersOption,
    cli_errors,
    console,
    emit_json,
    engine_options,
    input_options,
    options_from,
    progress,
    register_engine,
    register_options,
    reports_to_stderr,
    show_progress,
)
from prefnoise.options import CorruptOptions
from prefnoise.options.corrupt import NOISE_MODELS

NoiseOption = Annotated[str, typer.Option("--noise", help=f"Noise model: {', '.join(NOISE_MODELS)}.")]
RateOption = Annotated[float | None, typer.Option("--rate", help="symmetric: flip probability of every pair.")]
RatePosOption = Annotated[
    float | None, typer.Option("--rate-pos", help="asymmetric: flip probability of positive pairs.")
]
RateNegOption = Annotated[
    float | None, typer.Option("--rate-neg", help="asymmetric: flip probability of the other pairs.")
]
ByOption = Annotated[
    str, typer.Option("--by", help="asymmetric: which pairs are positive: longer, column:NAME or compare:NAME.")
]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="bt: flip probability σ(−(s_c − s_r)/T).")]
MaxRateOption = Annotated[float, typer.Option("--max-rate", help="uniform: each pair's flip probability ~ U[0, MAX].")]
ExactOption = Annotated[
    bool, typer.Option("--exact", help="Flip exactly round(rate·n) pairs (per group) instead of independent draws.")
]
ForceOption = Annotated[bool, typer.Option("--force", help="Allow rates that leave the labels without signal.")]


register_options("corrupt", CorruptOptions)
register_engine("corrupt")


@app.command("corrupt")
@cli_errors
def corrupt_command(
    source: InputArgument,
    dest: OutArgument,
    noise: NoiseOption = CorruptOptions.noise,
    rate: RateOption = CorruptOptions.rate,
    rate_pos: RatePosOption = CorruptOptions.rate_pos,
    rate_neg: RateNegOption = CorruptOptions.rate_neg,
    by: ByOption = CorruptOptions.by,
    temperature: TemperatureOption = CorruptOptions.temperature,
    max_rate: MaxRateOption = CorruptOptions.max_rate,
    exact: ExactOption = CorruptOptions.exact,
    force: ForceOption = CorruptOptions.force,
    overwrite: OverwriteOption = False,
    seed: SeedOption = CorruptOptions.seed,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Flip preference labels with a controlled noise model; record which rows in `flipped`."""

    running = engine_options(locals())  # checked first: --workers 0 is refused as such, whatever the noise flags
    summary = api.corrupt(
        source, dest, options_from(CorruptOptions, locals()), overwrite=overwrite,
        progress_bar=functools.partial(progress, enabled=show_progress(json_output)), **input_options(locals()),
        engine=running,
    ).summary
    if json_output:
        emit_json(summary, to_stderr=dest == "-")
    else:
        reports_to_stderr(dest == "-")
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"corrupt: {summary['noise']} noise", title_justify="left")
    for header in ("group", "rows", "flips", "realized rate", "95% interval", "expected"):
        table.add_column(header, justify="left" if header == "group" else "right")
    for name, group in summary["groups"].items():
        low, high = group["ci95"]
        table.add_row(
            name,
            f"{group['rows']:,}",
            f"{group['flips']:,}",
            f"{group['rate']:.4f}",
            f"[{low:.4f}, {high:.4f}]",
            f"{group['expected_rate']:.4f}",
        )
    console.print(table)
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items())
    console.print(
        f"{summary['rows']:,} rows, {summary['flips']:,} flipped → {summary['output']}"
        f" in {summary['seconds']:.2f} s ({summary['rows_per_second'] or 0:,} rows/s)"
        + (f"; dropped {dropped}" if dropped else "")
    )
