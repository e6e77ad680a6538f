"""pn.corrupt: flip labels of a table by a noise rule (the `corrupt` command)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.tables import (
    ProgressBar,
    Table,
    check_api_options,
    gather_input_options,
    input_table,
    no_bar,
    output_name,
    path_of,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import releases_outputs


@dataclass
class CorruptResult:
    """``pn.corrupt``'s result: the noisy table (None when it was streamed to ``out``) and the summary."""

    table: pl.DataFrame | None
    summary: dict[str, Any]


@releases_outputs
def corrupt(
    data: Table,
    out: str | Path | None = None,
    *,
    noise: str = "symmetric",
    rate: float | None = None,
    rate_pos: float | None = None,
    rate_neg: float | None = None,
    by: str = "longer",
    temperature: float = 1.0,
    max_rate: float = 0.3,
    exact: bool = False,
    force: bool = False,
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> CorruptResult:
    """``prefnoise corrupt``: flip labels with a controlled noise model; record which rows in ``flipped``.

    Options are the CLI's (``noise``: symmetric, asymmetric, bt or uniform, with ``rate``, ``rate_pos``/
    ``rate_neg`` + ``by``, ``temperature``, ``max_rate``; ``exact``; ``force``; ``seed``). With ``out`` the
    table is streamed to that file batch by batch (memory stays flat; ``table`` is then None); without it
    the noisy table is returned. ``summary`` is ``corrupt --json``'s object (flips per group with intervals).
    """
    from prefnoise.data import new_history_entry, write_table
    from prefnoise.noise import CorruptionStats, NoiseSpec, corrupt_batches, corrupt_step, exact_thresholds
    from prefnoise.outputs import check_output_file
    from prefnoise.pair_ids import PairIdCheck

    check_api_options(locals())
    spec = NoiseSpec(
        kind=noise, rate=rate, rate_pos=rate_pos, rate_neg=rate_neg, by=by, temperature=temperature,
        max_rate=max_rate, exact=exact, seed=seed, force=force, drop_invalid=drop_invalid,
    )
    spec.check()
    if out is not None:
        check_output_file(out, inputs=[path_of(data)], overwrite=overwrite)
    started = time.perf_counter()
    src = input_table(
        data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
    )
    spec = dataclasses.replace(spec, step=corrupt_step(src.history))  # each corrupt step draws afresh
    spec.check(src.schema)
    entry = new_history_entry("corrupt", spec.parameters(), seed=seed, source=src.source)
    stats = CorruptionStats()
    table = None
    with (progress_bar or no_bar)("corrupting", src.total_rows()) as advance:
        thresholds = exact_thresholds(src.batches(), spec, name=src.name) if spec.exact else None
        inputs = PairIdCheck(src.name, reread=src.batches).watch(src.batches())
        batches = corrupt_batches(inputs, spec, stats=stats, thresholds=thresholds, on_progress=advance, name=src.name)
        if out is None:
            frames = list(batches)
            if not frames:
                raise PrefnoiseError("no rows left: every input row was filtered out")
            table = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
        else:
            write_table(batches, out, entry=entry, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    summary = {
        "input": src.name,
        "output": output_name(out),
        "noise": noise,
        **stats.to_dict(),
        "dropped": {**src.dropped, **stats.dropped},
        "seconds": round(elapsed, 3),
        "rows_per_second": round(stats.rows / elapsed) if elapsed > 0 else None,
    }
    return CorruptResult(table, summary)
