"""`prefnoise split IN TRAIN TEST`: a deterministic, prompt-disjoint held-out split."""

from __future__ import annotations

from typing import Annotated

import typer

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
    register_engine,
    register_options,
    reports_to_stderr,
)
from prefnoise.options import SplitOptions

SplitByOption = Annotated[str, typer.Option("--by", help="prompt (default: no prompt on both sides) or pair.")]
TestFractionOption = Annotated[float, typer.Option("--test-fraction", help="Share of prompts (or pairs) held out.")]


register_options("split", SplitOptions)
register_engine("split")


@app.command("split")
@cli_errors
def split_command(
    source: InputArgument,
    train_dest: Annotated[str, typer.Argument(metavar="TRAIN", help="Output Parquet file for the training side.")],
    test_dest: Annotated[str, typer.Argument(metavar="TEST", help="Output Parquet file for the held-out side.")],
    test_fraction: TestFractionOption = SplitOptions.test_fraction,
    by: SplitByOption = SplitOptions.by,
    seed: SeedOption = SplitOptions.seed,
    overwrite: OverwriteOption = False,
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
    """Split a table into training and held-out parts, prompt-disjoint by default; provenance recorded."""

    summary = api.split(
        source, train_dest, test_dest, options_from(SplitOptions, locals()), overwrite=overwrite,
        **input_options(locals()), engine=engine_options(locals()),
    ).summary
    data_on_stdout = "-" in (train_dest, test_dest)
    if json_output:
        emit_json(summary, to_stderr=data_on_stdout)
        return
    reports_to_stderr(data_on_stdout)
    train, test = summary["train"], summary["test"]
    console.print(
        f"split: {summary['rows']:,} rows by {by} → {train['rows']:,} train ({train['prompts']:,} prompts) "
        f"→ {train_dest}, {test['rows']:,} test ({test['prompts']:,} prompts) → {test_dest}; "
        f"{summary['shared_prompts']} prompts on both sides"
    )

