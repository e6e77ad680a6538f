"""`prefnoise score MODEL DATA OUT`: add learned rewards to a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import polars as pl
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
    cli_errors,
    console,
    emit_json,
    open_input,
    progress,
    show_progress,
)
from prefnoise.data import new_history_entry, open_source, read_history, write_table
from prefnoise.heldout import IN_TRAINING, IN_VALIDATION, agreement_summary, mark_seen, read_training_pairs
from prefnoise.outputs import check_output_file

SEEN = (IN_TRAINING, IN_VALIDATION)


def read_long_table(source: str) -> pl.DataFrame:
    """A (prompt, response) table from any readable format (``-``: stdin), without pair validation."""
    return open_source(source).scan_raw().collect()


@app.command("score")
@cli_errors
def score_command(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL", help="Directory written by `prefnoise fit-reward`.")],
    data: Annotated[str, typer.Argument(metavar="DATA", help="Preference table, or - for stdin.")],
    dest: Annotated[str, typer.Argument(metavar="OUT", help="Output Parquet file, or - for stdout.")],
    responses: Annotated[
        bool, typer.Option("--responses", help="DATA is a long table of (prompt, response) rows; add `reward`.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Responses per forward pass.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="embed+mlp embedding cache.")] = None,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
) -> None:
    """Add chosen_reward/rejected_reward (or `reward` with --responses) from a trained reward model."""
    from prefnoise.reward import load_reward_model, score_responses, score_table
    from prefnoise.reward.models import describe_truncation

    check_output_file(dest, inputs=[model_dir, data], overwrite=overwrite)
    started = time.perf_counter()
    model = load_reward_model(model_dir, cache_dir=cache_dir)
    splits = read_training_pairs(model_dir)
    parameters = {"model": str(model_dir), "responses": responses, "batch_size": batch_size}
    if responses:
        frame = read_long_table(data)
        history = read_history(data) if data != "-" and Path(data).suffix == ".parquet" else []
        entry = new_history_entry("score", parameters)
        score, total = score_responses, frame.height
    else:
        src = open_input(data, prompt_col, chosen_col, rejected_col, layout, drop_invalid)
        frame = src.collect()
        history = src.history
        entry = new_history_entry("score", parameters, source=src)
        score, total = score_table, frame.height
    with progress("scoring", total, enabled=show_progress(json_output)) as advance:
        scored = score(model, frame, batch_size, device=device, on_progress=advance, drop_invalid=drop_invalid,
                       source="<stdin>" if data == "-" else data, model_name=str(model_dir))
    if splits is not None and not responses:
        scored = mark_seen(scored, splits)  # in_training / in_validation travel on to rank-check --group-by
    rows = write_table(scored, dest, entry=entry, history=history, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    summary = {
        "model": str(model_dir),
        "backend": model.backend,
        "rows": rows,
        "output": "<stdout>" if dest == "-" else dest,
        "columns": [C.REWARD] if responses else [c for c in scored.columns if c.endswith(C.REWARD) or c in SEEN],
        "seconds": round(elapsed, 3),
    }
    if not responses:
        summary.update(agreement_summary(scored))
    cut = describe_truncation(getattr(model, "truncation", []), model.config.get("max_length") or 0)
    summary["truncated_sequences"] = sum(s["truncated"] for s in getattr(model, "truncation", []))
    if json_output:
        emit_json(summary, to_stderr=dest == "-")
        return
    if cut:
        console.print(cut)
    console.print(f"score: {rows:,} rows with {model.backend} rewards → {summary['output']} in {elapsed:.2f} s")
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
