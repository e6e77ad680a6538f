"""pn.audit: estimate how noisy a table's labels are (the `audit` command)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.engines import MODEL_STAYS_LOCAL, engine_of, engine_paths, name_input, refuse_uris
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
    raw_lazy,
)
from prefnoise.data import new_history_entry, write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.experiments.figures import margin_histogram
from prefnoise.options.audit import AuditOptions
from prefnoise.options.engine import EngineOptions
from prefnoise.outputs import check_distinct_outputs, check_output_file, releases_outputs


@dataclass
class AuditResult:
    """``pn.audit``'s result: the table with ``suspicion`` (and ``oof_margin``, ``fold`` from margins, or
    ``consensus`` from annotators; cleaned with ``fix``), the estimate (``estimate.identifiable``,
    ``estimate.rate``: None when undetermined, with ``estimate.reason``), and the summary (``audit --json``)."""

    table: pl.DataFrame
    estimate: Any
    summary: dict[str, Any]


@releases_outputs
def audit(
    data: Table,
    out: str | Path | None = None,
    options: AuditOptions | None = None,
    *,
    annotators: list[str] | str | None = None, votes: str | Path | None = None, position_col: str | None = None,
    by: list[str] | str | None = None, gold: str | None = None, folds: int = 5, refits: int = 3,
    reward_col: str | None = None, margin_col: str | None = None, loss: str = "sigmoid", model: str | None = None,
    encoder: str | None = None, embed_features: str | None = None, epochs: int | None = None,
    batch_size: int | None = None, lr: float | None = None, hidden: int = 256, max_length: int | None = None,
    head: str | None = None, device: str = "auto", bootstrap: int = 200, show_suspects: int = 10,
    show_text: bool = False, plot: str | Path | None = None, fix: str | None = None, threshold: float = 0.5,
    overwrite: bool = False, seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT, chosen_col: str = C.CHOSEN, rejected_col: str = C.REJECTED,
    layout: str = "auto", drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    engine: str | EngineOptions = "local", ray_address: str | None = None, workers: int | None = None,
    reuse_margins: bool = False,
    **input_options: Any,
) -> AuditResult:
    """``prefnoise audit``: estimate the flip rate of the table's labels and score each pair's suspicion.

    The evidence (see :class:`prefnoise.options.audit.AuditOptions`): other annotators' votes
    (``annotators`` columns, a long ``votes`` table; Dawid–Skene), out-of-sample margins as given
    (``reward_col``/``margin_col``), or ``folds`` × ``refits`` cross-fitted reward models; with ``gold`` (a column
    of trusted votes on a random subset) the gold pairs correct those margins. When the rate is
    undetermined (``result.estimate.identifiable`` False) the summary's rate is None with a reason, and
    ``fix`` ("drop" or "swap", with ``out``) refuses with a PrefnoiseError of exit code 4. ``engine="ray"``
    (``ray_address``, ``workers``: docs/distributed.md) runs the embedding stage (embed+mlp's encoder batches)
    on Ray actors, with the same embeddings and so the same estimate (``data`` and ``out`` may then be URIs).
    ``reuse_margins``: take the fold models' margins of a previous audit of the same input when data and every
    option that shapes them match (``summary["margins_note"]`` says whether they were reused, or why not).
    """
    options = build_options(AuditOptions, options, locals())
    engine_options = engine_of(engine, ray_address, workers)
    refuse_uris([("--votes", options.votes), ("--plot", plot)])
    refuse_uris([("--model", options.model), ("--encoder", options.encoder)], MODEL_STAYS_LOCAL)
    with engine_paths(engine_options, data, [out], overwrite=overwrite, flags=["--out"]) as (
        local_data, (local_out,)
    ):
        _check_outputs(options, [path_of(local_data), options.votes], local_out, plot, overwrite)
        started = time.time()  # the history entry's duration covers the folds, not only the writing
        src = input_table(
            local_data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
        )
        name_input(src, data)
        outcome = _run(src, options, drop_invalid, progress_bar or no_bar, engine_options, reuse_margins)
        if local_out is not None:
            _write_table(outcome, src, options, local_out, started, overwrite)
    if plot is not None:
        margin_histogram(outcome.table["oof_margin"].to_numpy(), getattr(outcome.estimate, "mixture", None), plot)
    outcome.summary.update(input=src.name, output=output_name(out))
    return AuditResult(outcome.table, outcome.estimate, outcome.summary)


def _check_outputs(
    options: AuditOptions, inputs: list[Any], out: str | Path | None, plot: str | Path | None, overwrite: bool
) -> None:
    """What the outputs need (--fix writes the cleaned table to --out; --plot draws margins), and that
    neither output is an input, a file prefnoise did not write, or the other output."""
    if options.fix is not None and out is None:
        raise PrefnoiseError("--fix needs --out for the cleaned table")
    if plot is not None and options.with_annotators:
        raise PrefnoiseError("--plot draws out-of-fold margins, and an audit with annotators has none; drop --plot")
    check_output_file(out, inputs=inputs, overwrite=overwrite)
    check_output_file(plot, inputs=inputs, overwrite=overwrite, flag="--plot", suffix=".png")
    check_distinct_outputs({"--out": out, "--plot": plot})


def _run(
    src: InputTable, options: AuditOptions, drop_invalid: bool, progress_bar: ProgressBar,
    engine: EngineOptions | None = None, reuse_margins: bool = False,
) -> Any:
    """The audit of ``src``'s pairs (its table, estimate, summary), under a bar when fold models are fitted."""
    # pulls scipy and torch's reward models: loaded only when audit runs
    from prefnoise.noise_audit.run import run_audit
    from prefnoise.reward.remote import embedding_on  # same: torch

    votes = None if options.votes is None else raw_lazy(options.votes).collect()
    fits = not (options.with_annotators or options.given_margins)
    bar = progress_bar("cross-fitting folds", options.folds * options.refits) if fits else None
    with embedding_on(engine, options.device), bar or contextlib.nullcontext() as advance:
        return run_audit(src.collect(), options, name=src.name, votes=votes, drop_invalid=drop_invalid,
                         on_fold=advance, reuse_margins=reuse_margins)


def _write_table(
    outcome: Any, src: InputTable, options: AuditOptions, out: str | Path, started: float, overwrite: bool
) -> None:
    """Write the audited (or fixed) table to ``out`` with its history entry (``started``: time.time())."""
    entry = new_history_entry("audit", outcome.parameters, seed=options.seed, source=src.source)
    entry.started = started
    entry.extra["noise_estimate"] = outcome.history_estimate
    if options.fix is not None:
        entry.extra["fixed_pairs"] = outcome.summary["fixed"]
    write_table(outcome.table, out, entry=entry, overwrite=overwrite)
