"""pn.rank_check: does a learned reward rank responses like the true one (the `rank-check` command)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.engines import MODEL_STAYS_LOCAL, engine_of, engine_paths, refuse_uris
from prefnoise.api.scoring import score
from prefnoise.api.tables import (
    ProgressBar,
    Table,
    _is_path,
    build_options,
    no_bar,
    path_of,
    raw_lazy,
    split_options,
    table_label,
)
from prefnoise.engine import map_blocks, ray_session
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics import DEFAULT_MEMORY_RESPONSES, figure_frames, rank_report
from prefnoise.metrics.gates import failed_gate_lines, gate_results
from prefnoise.options import EngineOptions, RankCheckOptions
from prefnoise.outputs import check_output_file, releases_outputs

BUCKETS_PER_WORKER = 2  # --engine ray: prompt buckets per worker (each bucket's statistics are one task)


@dataclass
class RankCheckResult:
    """``pn.rank_check``'s result: the :class:`prefnoise.metrics.RankReport`, the summary (``rank-check
    --json``'s object, with ``gates``: one ``{metric, op, threshold, value, passed}`` per gate set), and
    whether every gate passed."""

    report: Any
    summary: dict[str, Any]

    @property
    def failures(self) -> list[str]:
        """One line per failed gate, for a person (``summary["gates"]`` holds them as data)."""
        return failed_gate_lines(self.summary["gates"])

    @property
    def passed(self) -> bool:
        """True when no gate failed (the CLI exits 1 otherwise)."""
        return not self.failures


@releases_outputs
def rank_check(
    data: Table, options: RankCheckOptions | None = None, *,
    pred: str = C.REWARD, true: str | None = None, long: bool = False,
    group_by: list[str] | tuple[str, ...] | str | None = None, bootstrap: int = 1000, show_worst: int = 0,
    min_agreement: float | None = None, min_kendall: float | None = None, min_preservation: float | None = None,
    memory_responses: int | None = None, temp_dir: str | Path | None = None, seed: int = C.DEFAULT_SEED,
    model: Any = None, device: str = "auto", batch_size: int | None = None,
    plot: str | Path | None = None, overwrite: bool = False, drop_invalid: bool = False,
    chosen_score_col: str | None = None, rejected_score_col: str | None = None, split: str | None = None,
    config: str | None = None,
    progress_bar: ProgressBar | None = None,
    engine: str | EngineOptions = "local", ray_address: str | None = None, workers: int | None = None,
    **input_options: Any,
) -> RankCheckResult:
    """``prefnoise rank-check``: pairwise agreement, rank preservation, Kendall's tau-b and Spearman's rho of a
    predicted reward against the true one (or the labels), overall and per ``flipped``/``group_by``.
    ``data``: a scored pair table (``chosen_<pred>``/``rejected_<pred>``) or, with ``long``, a long table.
    Options: :class:`prefnoise.options.RankCheckOptions`. ``chosen_score_col``/``rejected_score_col`` map the
    true reward. With ``model``, ``data`` is scored first (:func:`score`; input options such as ``prompt_col``
    or ``drop_invalid`` then apply). Failed ``min_*`` gates go to ``result.failures``; ``plot`` writes a PNG.
    ``engine="ray"`` (``ray_address``, ``workers``: docs/distributed.md) runs the model's batches and the prompt
    buckets' statistics on Ray; the numbers equal one process's to 1e-12; ``data`` may then be a filesystem URI.
    """

    options = build_options(RankCheckOptions, options, locals())
    engine_options = engine_of(engine, ray_address, workers)
    refuse_uris([("--plot", plot)])
    refuse_uris([("--model", options.model)], MODEL_STAYS_LOCAL)
    label = str(data) if _is_path(data) else table_label(data)  # as given (the CLI's JSON keeps '-')
    sources = {"chosen_score_col": chosen_score_col, "rejected_score_col": rejected_score_col, "split": split,
               "config": config}
    # a remote DATA is read from a private local copy, kept until the figure is drawn from it
    with engine_paths(engine_options, data, [], overwrite=overwrite) as (local_data, _):
        check_output_file(plot, inputs=[path_of(local_data)], overwrite=overwrite, flag="--plot", suffix=".png")
        with _buckets_on(engine_options) as (map_buckets, min_buckets):
            scoring = {**input_options, **({"drop_invalid": True} if drop_invalid else {})}
            lazy = _rewards(local_data, options, sources, scoring, engine_options)
            memory = DEFAULT_MEMORY_RESPONSES if options.memory_responses is None else options.memory_responses
            with (progress_bar or no_bar)("rank-check %", 100) as advance:
                report = rank_report(
                    lazy, pred=options.pred, true=options.true, group_by=list(options.group_by),
                    n_boot=options.bootstrap, seed=options.seed, worst=options.show_worst,
                    layout="long" if options.long else "auto", memory_responses=memory, temp_dir=options.temp_dir,
                    on_progress=advance, map_buckets=map_buckets, min_buckets=min_buckets, name=label,
                )
        gates = gate_results(report.overall, options.min_agreement, options.min_kendall, options.min_preservation)
        if plot is not None:
            _rank_plot(lazy, report, Path(plot), options.seed)
    return RankCheckResult(report, {"input": label, **report.to_dict(), "gates": gates})


@contextlib.contextmanager
def _buckets_on(engine: EngineOptions) -> Iterator[tuple[Any, int]]:
    """(``map_buckets``, ``min_buckets``) for :func:`rank_report`: here (None, 1), or with ``--engine ray``
    the prompt buckets on the Ray workers, a few per worker, inside one Ray session."""
    if not engine.distributed:
        yield None, 1
        return
    with ray_session(engine) as session:

        def on_workers(work: Any, buckets: Any) -> Iterator[Any]:
            return map_blocks(session, (pl.DataFrame(bucket) for bucket in buckets), work)

        yield on_workers, BUCKETS_PER_WORKER * session.workers


def _rewards(
    data: Table, options: RankCheckOptions, source_options: dict[str, Any], input_options: dict[str, Any],
    engine: EngineOptions | None = None,
) -> pl.LazyFrame:
    """The table to check: ``data`` scored by ``options.model``, or as it is (a file lazily)."""
    if options.model is not None:
        scored = score(options.model, data, device=options.device, batch_size=options.batch_size, engine=engine,
                       **source_options, **input_options)
        return scored.table.lazy()
    split_options(input_options)  # only input options are accepted
    if any(v not in (None, False, C.PROMPT, C.CHOSEN, C.REJECTED, "auto") for v in input_options.values()):
        raise PrefnoiseError(
            "the column, layout and --drop-invalid options apply with --model only (rank-check reads DATA as is)"
        )
    # a file: resolves "-" (spooled stdin), existence, format and hub ids; adds the mapped true scores
    return raw_lazy(data, **source_options)


def _rank_plot(lazy: pl.LazyFrame, report: Any, out: Path, seed: int) -> None:
    from prefnoise.plots import rank_check_figure  # pulls matplotlib: loaded only when a figure is drawn

    points, pairs = figure_frames(lazy, pred=report.pred, true=report.true or C.SCORE, layout=report.layout)
    x, y = ("true", "pred") if "true" in points.columns else ("rejected", "chosen")
    rank_check_figure(
        points[x].to_numpy(), points[y].to_numpy(), pairs["true_margin"].to_numpy(), pairs["outcome"].to_numpy(),
        agreement=report.overall.agreement.value, out=out, seed=seed, labels=(f"{x} reward", f"{y} reward"),
    )
