"""pn.corrupt: flip labels of a table by a noise rule (the `corrupt` command)."""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.engines import engine_of, engine_paths, engine_session, name_input
from prefnoise.api.tables import (
    InputTable,
    ProgressBar,
    Table,
    build_options,
    gather_input_options,
    input_table,
    no_bar,
    output_name,
    path_of,
    raw_frame,
)
from prefnoise.data import new_history_entry, write_table
from prefnoise.engine import RaySession
from prefnoise.engine.corrupt import corrupt_on_ray, exact_thresholds_on_ray
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import CorruptionStats, NoiseSpec, corrupt_batches, corrupt_step, exact_thresholds
from prefnoise.noise import corrupt_frame as corrupt_polars
from prefnoise.options import CorruptOptions
from prefnoise.outputs import check_output_file, releases_outputs
from prefnoise.pair_ids import PairIdCheck


@dataclass
class CorruptResult:
    """``pn.corrupt``'s result: the noisy table (None when it was streamed to ``out``) and the summary."""

    table: pl.DataFrame | None
    summary: dict[str, Any]


def noise_spec(options: CorruptOptions, *, drop_invalid: bool = False, step: int = 0) -> NoiseSpec:
    """The library's NoiseSpec of checked corrupt options (``step``: earlier corrupt steps of the data)."""
    fields = {item.name: getattr(options, item.name) for item in dataclasses.fields(options) if item.name != "noise"}
    return NoiseSpec(kind=options.noise, drop_invalid=drop_invalid, step=step, **fields)


@releases_outputs
def corrupt(
    data: Table,
    out: str | Path | None = None,
    options: CorruptOptions | None = None,
    *,
    noise: str = "symmetric", rate: float | None = None, rate_pos: float | None = None,
    rate_neg: float | None = None, by: str = "longer", temperature: float = 1.0, max_rate: float = 0.3,
    exact: bool = False, force: bool = False, seed: int = C.DEFAULT_SEED,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT, chosen_col: str = C.CHOSEN, rejected_col: str = C.REJECTED,
    layout: str = "auto", drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    engine: str = "local", ray_address: str | None = None, workers: int | None = None,
    **input_options: Any,
) -> CorruptResult:
    """``prefnoise corrupt``: flip labels with a controlled noise model; record which rows in ``flipped``.

    The options are :class:`prefnoise.options.CorruptOptions`'s (pass one as ``options`` or its fields as
    keywords). With ``out`` the table is streamed to that file batch by batch (memory stays flat; ``table``
    is then None); without it the noisy table is returned. ``summary`` is ``corrupt --json``'s object
    (flips per group with intervals). Input options (``prompt_col``, ..., ``split``, ``config``) as the CLI's.
    ``engine="ray"`` corrupts blocks on a Ray cluster (``ray_address`` joins one, ``workers`` sizes a local one;
    paths may then be filesystem URIs): the same output and summary, byte for byte (docs/distributed.md).
    """

    options = build_options(CorruptOptions, options, locals())
    engine_options = engine_of(engine, ray_address, workers)
    started = time.perf_counter()
    with engine_paths(engine_options, data, [out], overwrite=overwrite) as (local_data, (local_out,)):
        if local_out is not None:
            check_output_file(local_out, inputs=[path_of(local_data)], overwrite=overwrite)
        src = input_table(
            local_data,
            gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options),
        )
        name_input(src, data)
        with engine_session(engine_options) as session:
            table, stats = _corrupt_input(
                src, options, local_out, overwrite, drop_invalid, progress_bar or no_bar, session
            )
    elapsed = time.perf_counter() - started
    summary = {
        "input": src.name, "output": output_name(out), "noise": options.noise, **stats.to_dict(),
        "dropped": {**src.dropped, **stats.dropped}, "seconds": round(elapsed, 3),
        "rows_per_second": round(stats.rows / elapsed) if elapsed > 0 else None,
    }
    return CorruptResult(table, summary)


def _corrupt_input(
    src: InputTable, options: CorruptOptions, out: str | Path | None, overwrite: bool, drop_invalid: bool,
    progress_bar: ProgressBar, session: RaySession | None = None,
) -> tuple[pl.DataFrame | None, CorruptionStats]:
    """Corrupt ``src`` batch by batch into ``out`` (returning no table) or into memory; with ``session``
    each batch is corrupted on the Ray cluster."""

    # each corrupt step of the data's history draws afresh
    spec = noise_spec(options, drop_invalid=drop_invalid, step=corrupt_step(src.history))
    spec.check(src.schema)
    entry = new_history_entry("corrupt", spec.parameters(), seed=options.seed, source=src.source)
    stats = CorruptionStats()
    with progress_bar("corrupting", src.total_rows()) as advance:
        thresholds = None
        if spec.exact:
            thresholds = (
                exact_thresholds(src.batches(), spec, name=src.name) if session is None
                else exact_thresholds_on_ray(session, src.batches(), spec, name=src.name)
            )
        inputs = PairIdCheck(src.name, reread=src.batches).watch(src.batches())
        corrupting = corrupt_batches if session is None else functools.partial(corrupt_on_ray, session)
        batches = corrupting(inputs, spec, stats=stats, thresholds=thresholds, on_progress=advance, name=src.name)
        if out is not None:
            write_table(batches, out, entry=entry, overwrite=overwrite)
            return None, stats
        frames = list(batches)
    if not frames:
        raise PrefnoiseError("no rows left: every input row was filtered out")
    return (pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]), stats


def corrupt_frame(table: Table, spec: NoiseSpec | CorruptOptions) -> tuple[pl.DataFrame, CorruptionStats]:
    """Corrupt an in-memory canonical table (polars, pandas, pyarrow, ``datasets.Dataset``, dict or rows)
    by ``spec`` (a NoiseSpec or CorruptOptions); return it as polars with the flip counts."""

    frame = table if isinstance(table, pl.DataFrame) else raw_frame(table)
    return corrupt_polars(frame, noise_spec(spec) if isinstance(spec, CorruptOptions) else spec)
