"""`prefnoise corrupt IN OUT`: inject controlled label noise."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

import typer
from rich.table import Table

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
    progress,
    show_progress,
)
from prefnoise.data import new_history_entry, write_table
from prefnoise.noise import (
    NOISE_MODELS,
    CorruptionStats,
    NoiseSpec,
    corrupt_batches,
    corrupt_step,
    exact_thresholds,
)
from prefnoise.outputs import check_output_file
from prefnoise.pair_ids import PairIdCheck


@app.command("corrupt")
@cli_errors
def corrupt_command(
    source: Annotated[
        str, typer.Argument(metavar="IN", help="Input table (Parquet, JSONL, CSV, saved dataset, or - for stdin).")
    ],
    dest: Annotated[str, typer.Argument(metavar="OUT", help="Output Parquet file, or - for stdout.")],
    noise: Annotated[str, typer.Option("--noise", help=f"Noise model: {', '.join(NOISE_MODELS)}.")] = "symmetric",
    rate: Annotated[float | None, typer.Option("--rate", help="symmetric: flip probability of every pair.")] = None,
    rate_pos: Annotated[
        float | None, typer.Option("--rate-pos", help="asymmetric: flip probability of positive pairs.")
    ] = None,
    rate_neg: Annotated[
        float | None, typer.Option("--rate-neg", help="asymmetric: flip probability of the other pairs.")
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="asymmetric: which pairs are positive: longer, column:NAME or compare:NAME.")
    ] = "longer",
    temperature: Annotated[float, typer.Option("--temperature", help="bt: flip probability σ(−(s_c − s_r)/T).")] = 1.0,
    max_rate: Annotated[
        float, typer.Option("--max-rate", help="uniform: each pair's flip probability ~ U[0, MAX].")
    ] = 0.3,
    exact: Annotated[
        bool, typer.Option("--exact", help="Flip exactly round(rate·n) pairs (per group) instead of independent draws.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow rates that leave the labels without signal.")] = False,
    overwrite: OverwriteOption = False,
    seed: SeedOption = C.DEFAULT_SEED,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
) -> None:
    """Flip preference labels with a controlled noise model; record which rows in `flipped`."""
    spec = NoiseSpec(
        kind=noise,
        rate=rate,
        rate_pos=rate_pos,
        rate_neg=rate_neg,
        by=by,
        temperature=temperature,
        max_rate=max_rate,
        exact=exact,
        seed=seed,
        force=force,
        drop_invalid=drop_invalid,
    )
    spec.check()
    check_output_file(dest, inputs=[source], overwrite=overwrite)
    started = time.perf_counter()
    src = open_input(source, prompt_col, chosen_col, rejected_col, layout, drop_invalid)
    spec = dataclasses.replace(spec, step=corrupt_step(src.history))  # each corrupt step draws afresh
    spec.check(src.schema)
    entry = new_history_entry("corrupt", spec.parameters(), seed=seed, source=src)
    stats = CorruptionStats()
    with progress("corrupting", src.total_rows(), enabled=show_progress(json_output)) as advance:
        thresholds = exact_thresholds(src.batches(), spec, name=src.name) if spec.exact else None
        inputs = PairIdCheck(src.name, reread=src.batches).watch(src.batches())
        batches = corrupt_batches(
            inputs, spec, stats=stats, thresholds=thresholds, on_progress=advance, name=src.name
        )
        write_table(batches, dest, entry=entry, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    summary = {
        "input": src.name,
        "output": "<stdout>" if dest == "-" else dest,
        "noise": noise,
        **stats.to_dict(),
        "dropped": {**src.dropped, **stats.dropped},
        "seconds": round(elapsed, 3),
        "rows_per_second": round(stats.rows / elapsed) if elapsed > 0 else None,
    }
    if json_output:
        emit_json(summary, to_stderr=dest == "-")
    else:
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
