"""`prefnoise split IN TRAIN TEST`: a deterministic, prompt-disjoint held-out split."""

from __future__ import annotations

from typing import Annotated

import typer

from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    DropInvalidOption,
    JsonOption,
    LayoutOption,
    OverwriteOption,
    PromptColOption,
    RejectedColOption,
    SeedOption,
    cli_errors,
    console,
    emit_json,
    open_input,
)
from prefnoise.data import new_history_entry, write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import check_split_options, split_table
from prefnoise.outputs import check_distinct_outputs, check_output_file


@app.command("split")
@cli_errors
def split_command(
    source: Annotated[str, typer.Argument(metavar="IN", help="Preference table (any readable format, or -).")],
    train_dest: Annotated[str, typer.Argument(metavar="TRAIN", help="Output Parquet file for the training side.")],
    test_dest: Annotated[str, typer.Argument(metavar="TEST", help="Output Parquet file for the held-out side.")],
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of prompts (or pairs) held out.")
    ] = 0.2,
    by: Annotated[
        str, typer.Option("--by", help="prompt (default: no prompt on both sides) or pair.")
    ] = "prompt",
    seed: SeedOption = C.DEFAULT_SEED,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
) -> None:
    """Split a table into training and held-out parts, prompt-disjoint by default; provenance recorded."""
    check_split_options(test_fraction, by)  # before the input is read
    if "-" in (train_dest, test_dest):
        raise PrefnoiseError("TRAIN and TEST must be files (two tables cannot share stdout)")
    for dest in (train_dest, test_dest):
        check_output_file(dest, inputs=[source], overwrite=overwrite)
    check_distinct_outputs({"TRAIN": train_dest, "TEST": test_dest})
    src = open_input(source, prompt_col, chosen_col, rejected_col, layout, drop_invalid)
    frame = src.collect()
    train, test = split_table(frame, test_fraction=test_fraction, by=by, seed=seed)
    if train.height == 0 or test.height == 0:
        raise PrefnoiseError(
            f"{src.name}: the split left the {'training' if train.height == 0 else 'test'} side empty "
            f"({frame.height} rows, --test-fraction {test_fraction}); use more data or another fraction"
        )
    parameters = {"test_fraction": test_fraction, "by": by}
    for part, table, dest in (("train", train, train_dest), ("test", test, test_dest)):
        entry = new_history_entry("split", {**parameters, "part": part}, seed=seed, source=src)
        write_table(table, dest, entry=entry, overwrite=overwrite)
    summary = {
        "input": src.name,
        "rows": frame.height,
        "by": by,
        "seed": seed,
        "train": {"output": train_dest, "rows": train.height, "prompts": train[C.PROMPT].n_unique()},
        "test": {"output": test_dest, "rows": test.height, "prompts": test[C.PROMPT].n_unique()},
        "shared_prompts": len(set(train[C.PROMPT].unique().to_list()) & set(test[C.PROMPT].unique().to_list())),
    }
    if json_output:
        emit_json(summary)
        return
    console.print(
        f"split: {frame.height:,} rows by {by} → {train.height:,} train ({summary['train']['prompts']:,} prompts) "
        f"→ {train_dest}, {test.height:,} test ({summary['test']['prompts']:,} prompts) → {test_dest}; "
        f"{summary['shared_prompts']} prompts on both sides"
    )

