"""pn.compare_losses: which loss survives the noise on the user's own pairs (``prefnoise reproduce DATA``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.api.fitting import fit_reward
from prefnoise.api.scoring import score
from prefnoise.api.tables import (
    ProgressBar,
    Table,
    build_options,
    check_api_options,
    gather_input_options,
    input_table,
    no_bar,
    path_of,
    split_options,
    table_label,
)
from prefnoise.atomic import atomic_path
from prefnoise.experiments.figures import robustness_figure
from prefnoise.experiments.loss_comparison import (
    CellCache,
    check_grid,
    comparison_markdown,
    data_digest,
    figure_frame,
    run_grid,
    summarize,
)
from prefnoise.jsonvalues import strict_json_value
from prefnoise.loss_names import SYMMETRIC_LOSS_NAMES
from prefnoise.options import ComparisonOptions
from prefnoise.outputs import check_output_dir

COMMAND = "reproduce"


@dataclass
class ComparisonResult:
    """``pn.compare_losses``'s result: one row per (seed, rate, loss, test pair) and the summary (``--json``)."""

    rows: pl.DataFrame
    summary: dict[str, Any]


def compare_losses(
    data: Table,
    out: str | Path | None = None,
    options: ComparisonOptions | None = None,
    *,
    losses: tuple[str, ...] | list[str] | str = ("sigmoid", "ramp", "logistic"),
    rates: tuple[float, ...] | list[float] | str = (0.0, 0.2, 0.4),
    reference: str = "logistic", seeds: int = 3, noise: str = "symmetric", by: str = "longer",
    rate_neg: float = 0.0, test_fraction: float = 0.2, split_by: str = "prompt", bootstrap: int = 2000,
    seed: int = C.DEFAULT_SEED,
    overwrite: bool = False,
    command: str = "pn.compare_losses(...)",
    progress_bar: ProgressBar | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    prompt_col: str = C.PROMPT, chosen_col: str = C.CHOSEN, rejected_col: str = C.REJECTED,
    layout: str = "auto", drop_invalid: bool = False,
    **other_options: Any,
) -> ComparisonResult:
    """``prefnoise reproduce DATA``: split ``data`` by prompt, flip the training part at each rate, fit every
    loss on the same flips, score the untouched test part, and compare each loss to ``reference`` with
    paired intervals over prompts and seeds. Options: :class:`prefnoise.options.ComparisonOptions`
    (``options`` or its fields as keywords); further keywords are input options or any ``fit_reward``
    option (``model``, ``encoder``, ``epochs``, ``device``, ...), applied to every cell. With ``out``:
    results.parquet, results.md, summary.json and robustness.png; finished cells are cached beside ``out``
    (``.OUT.cells-*``) until the grid is written, so an interrupted run continues when rerun."""
    options = build_options(ComparisonOptions, options, locals())
    input_options, fit_options = split_options(other_options, others="fit_reward")
    check_api_options(fit_options)
    if out is not None:
        check_output_dir(out, command=COMMAND, inputs=[path_of(data)], overwrite=overwrite)
    frame = input_table(data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid,
                                                   input_options)).collect()
    check_grid(frame, options)  # data too small to split, or a noise rule it cannot take: before any write
    cache = _cell_cache(out, frame, options, fit_options) if out is not None else None
    cells = options.seeds * len(options.rates) * len(options.all_losses)
    with (progress_bar or no_bar)("cells", cells) as advance:
        done = (lambda cell: (advance(1), on_cell(cell))) if on_cell else (lambda cell: advance(1))
        rows = run_grid(frame, options, _fitter(fit_options), cache, done)
    summary = {"command": COMMAND, "input": path_of(data) or table_label(data), "output": None if out is None
               else str(out), "rows": frame.height,
               **summarize(rows, options), "options": dataclasses.asdict(options)}
    if out is not None:
        _write(Path(out), rows, summary, options, command)
        shutil.rmtree(cache.directory)  # prefnoise's own cell cache: the grid is complete and written
    return ComparisonResult(rows, summary)


def _fitter(fit_options: dict[str, Any]) -> Callable[[pl.DataFrame, pl.DataFrame, str, int], np.ndarray]:
    """One cell: fit-reward with ``fit_options`` on the noisy training part, then the test part's rewards."""
    def fit_cell(train: pl.DataFrame, test: pl.DataFrame, loss: str, cell_seed: int) -> np.ndarray:
        scored = score(fit_reward(train, loss=loss, seed=cell_seed, **fit_options), test).table
        return np.column_stack([scored[C.chosen(C.REWARD)].to_numpy(), scored[C.rejected(C.REWARD)].to_numpy()])

    return fit_cell


def _cell_cache(out: str | Path, frame: pl.DataFrame, options: ComparisonOptions, fit_options: dict) -> CellCache:
    """The cell cache of this grid beside ``out``: keyed by the data and every option that changes a cell."""
    out = Path(out)
    fingerprint = {"data": data_digest(frame), "noise": options.noise, "by": options.by,
                   "rate_neg": options.rate_neg, "test_fraction": options.test_fraction,
                   "split_by": options.split_by, "seed": options.seed,
                   "fit": {k: str(v) for k, v in sorted(fit_options.items())}}
    key = hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=6).hexdigest()
    return CellCache(out.parent / f".{out.name}.cells-{key}", fingerprint)


def _write(out: Path, rows: pl.DataFrame, summary: dict, options: ComparisonOptions, command: str) -> None:
    with atomic_path(out, directory=True, command=COMMAND) as tmp:
        rows.write_parquet(tmp / "results.parquet")
        (tmp / "results.md").write_text(comparison_markdown(summary, options, command), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(strict_json_value(summary), indent=2, default=str,
                                                     allow_nan=False) + "\n", encoding="utf-8")
        robustness_figure(figure_frame(summary), tmp / "robustness.png", symmetric_losses=SYMMETRIC_LOSS_NAMES,
                          y_label=summary["metric"], title="held-out agreement (95% interval over prompts and seeds)")
