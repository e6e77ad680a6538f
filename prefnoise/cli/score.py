"""`prefnoise score MODEL DATA OUT`: add learned rewards to a table."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prefnoise import api
from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    BatchSizeOption,
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    DeviceOption,
    DropInvalidOption,
    EngineOption,
    JsonOption,
    LayoutOption,
    OutArgument,
    OverwriteOption,
    PromptColOption,
    RayAddressOption,
    RejectedColOption,
    RejectedScoreColOption,
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
from prefnoise.data import open_source
from prefnoise.heldout import IN_TRAINING, IN_VALIDATION
from prefnoise.options import ScoreOptions

SEEN = (IN_TRAINING, IN_VALIDATION)


def read_long_table(source: str) -> pl.DataFrame:
    """A (prompt, response) table from any readable format (``-``: stdin), without pair validation."""
    return open_source(source).scan_raw().collect()


ResponsesOption = Annotated[
    bool, typer.Option("--responses", help="DATA is a long table of (prompt, response) rows; add `reward`.")
]

CacheDirOption = Annotated[Path | None, typer.Option("--cache-dir", help="embed+mlp embedding cache.")]

register_options("score", ScoreOptions)
register_engine("score")


@app.command("score")
@cli_errors
def score_command(
    model_dir: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Directory written by `prefnoise fit-reward`, or a sequence-classification reward model "
            "(num_labels=1, e.g. TRL's RewardTrainer output): a directory or a hub id in the local cache.",
        ),
    ],
    data: Annotated[str, typer.Argument(metavar="DATA", help="Preference table, or - for stdin.")],
    dest: OutArgument,
    responses: ResponsesOption = ScoreOptions.responses,
    batch_size: BatchSizeOption = ScoreOptions.batch_size,
    device: DeviceOption = ScoreOptions.device,
    cache_dir: CacheDirOption = ScoreOptions.cache_dir,
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
    """Add chosen_reward/rejected_reward (or `reward` with --responses) from a trained reward model."""

    result = api.score(
        model_dir, data, dest, options_from(ScoreOptions, locals()), overwrite=overwrite,
        progress_bar=functools.partial(progress, enabled=show_progress(json_output)), engine=engine_options(locals()),
        **input_options(locals()),
    )
    summary = result.summary
    if json_output:
        emit_json(summary, to_stderr=dest == "-")
        return
    reports_to_stderr(dest == "-")
    if result.truncation_note:
        console.print(result.truncation_note)
    console.print(
        f"score: {summary['rows']:,} rows with {summary['backend']} rewards → {summary['output']} "
        f"in {summary['seconds']:.2f} s"
    )
    if "accuracy" in summary:
        console.print(agreement_line(summary))


def agreement_line(summary: dict) -> str:
    """How well the rewards agree with the labels, never passing rows the model saw off as held out."""
    def both(prefix: str) -> str:
        text = f"{summary[prefix + 'accuracy']:.4f} with the given labels"
        clean = summary.get(prefix + "clean_accuracy")
        return text + (f", {clean:.4f} with the clean labels" if clean is not None else "")

    seen = summary.get("seen")
    if seen is None:
        return f"agreement on all rows: {both('')} (the model records no training pairs: none is known to be unseen)"
    if not seen["unseen"]:
        return (
            f"agreement on all rows: {both('')}; [bold]every row was seen by the model[/bold] ({seen['train']:,} in "
            f"training, {seen['val']:,} in validation), so this is no held-out figure: score a split-off test set "
            "(prefnoise split)"
        )
    return (
        f"agreement on the {seen['unseen']:,} rows the model never saw: {both('unseen_')}; on all rows "
        f"(incl. {seen['train']:,} training and {seen['val']:,} validation rows): {both('')}"
    )
