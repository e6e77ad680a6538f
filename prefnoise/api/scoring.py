"""pn.score: add a reward model's rewards to a table (the `score` command)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.engines import MODEL_STAYS_LOCAL, engine_of, engine_paths, name_input, refuse_uris
from prefnoise.api.fitting import FitRewardResult
from prefnoise.api.tables import (
    STDIO,
    ProgressBar,
    Table,
    _kind,
    build_options,
    gather_input_options,
    input_table,
    no_bar,
    output_name,
    path_of,
    raw_lazy,
    table_label,
)
from prefnoise.data import new_history_entry, read_history, write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import agreement_summary, mark_seen, read_training_pairs
from prefnoise.options import EngineOptions, ScoreOptions
from prefnoise.outputs import check_output_file, releases_outputs


@dataclass
class ScoreResult:
    """``pn.score``'s result: the table with rewards, the model used, and the summary."""

    table: pl.DataFrame
    model: Any
    summary: dict[str, Any]
    truncation_note: str | None = None  # one line on the sequences cut to max_length (None when none)


def _reward_model(model: Any, cache_dir: str | Path | None) -> tuple[Any, Any, str]:
    """(RewardModel, training pair splits or None, its name) from a path, hub id, fit result or model."""
    from prefnoise.reward import RewardModel, load_reward_model  # pulls torch: loaded only when a reward model runs

    if isinstance(model, str | Path):
        loaded = load_reward_model(model, cache_dir=cache_dir)
        splits = read_training_pairs(model) if Path(model).is_dir() else None
        return loaded, splits, str(model)
    if isinstance(model, FitRewardResult):
        model = model.fit
    if hasattr(model, "model") and hasattr(model, "pair_splits"):  # a FitResult
        return model.model, model.pair_splits, f"<{model.model.backend} reward model>"
    if isinstance(model, RewardModel):
        return model, None, f"<{model.backend} reward model>"
    raise PrefnoiseError(
        f"model: expected a reward model directory, a hub id, or what pn.fit_reward returned; got {_kind(model)}"
    )


@releases_outputs
def score(
    model: Any,
    data: Table,
    out: str | Path | None = None,
    options: ScoreOptions | None = None,
    *,
    responses: bool = False, batch_size: int | None = None, device: str = "auto",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT, chosen_col: str = C.CHOSEN, rejected_col: str = C.REJECTED,
    layout: str = "auto", drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    engine: str | EngineOptions = "local", ray_address: str | None = None, workers: int | None = None,
    **input_options: Any,
) -> ScoreResult:
    """``prefnoise score``: add ``chosen_reward``/``rejected_reward`` (``reward`` with ``responses``).

    ``model``: a directory written by ``fit-reward``, a sequence-classification model directory or hub id
    (num_labels=1, as TRL's RewardTrainer saves it), or what :func:`fit_reward` returned. Options:
    :class:`prefnoise.options.ScoreOptions`. Rows the model trained or validated on are marked
    (``in_training``/``in_validation``); ``summary`` is ``score --json``'s (agreement, held out where known).
    ``engine="ray"`` (``ray_address``, ``workers``: docs/distributed.md) runs the network batches on Ray actors
    (encoder batches of embed+mlp, eval batches of a transformer); the output equals the one-process run's
    byte for byte. ``data`` and ``out`` may then be filesystem URIs (``model`` stays local).
    """

    options = build_options(ScoreOptions, options, locals())
    engine_options = engine_of(engine, ray_address, workers)
    refuse_uris([("MODEL", model if isinstance(model, str | Path) else None)], MODEL_STAYS_LOCAL)
    started = time.perf_counter()
    with engine_paths(engine_options, data, [out], overwrite=overwrite) as (local_data, (local_out,)):
        if local_out is not None:
            model_input = str(model) if isinstance(model, str | Path) else None
            check_output_file(local_out, inputs=[model_input, path_of(local_data)], overwrite=overwrite)
        reward_model, splits, model_name = _reward_model(model, options.cache_dir)
        inputs = gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
        frame, history, entry = _scoring_input(local_data, options, model_name, inputs, name=data)
        with _remote_forward(engine_options, model, reward_model, options):
            on_driver = replace(options, device="cpu") if engine_options.distributed else options
            scored = _scored(reward_model, frame, on_driver, drop_invalid, table_label(data), model_name,
                             progress_bar)
        if splits is not None and not options.responses:
            scored = mark_seen(scored, splits)  # in_training / in_validation travel on to rank-check --group-by
        rows = (write_table(scored, local_out, entry=entry, history=history, overwrite=overwrite) if local_out
                else scored.height)
    summary = _summary(table_label(data), reward_model, scored, model_name, rows, out, options.responses, started)
    summary.update({} if options.responses else agreement_summary(scored))
    return _with_truncation(ScoreResult(scored, reward_model, summary))


@contextlib.contextmanager
def _remote_forward(engine: EngineOptions, model: Any, reward_model: Any, options: ScoreOptions) -> Iterator[None]:
    """With ``--engine ray``, the model's network batches run on Ray actors for the block: embed+mlp's encoder
    batches, a transformer's eval batches (the mlp backend's head is cheap and stays here)."""
    from prefnoise.reward.remote import RemoteForward, embedding_on, reward_source  # torch: only when scoring

    with embedding_on(engine, options.device) as session:
        if session is not None and reward_model.backend == "transformer":
            reward_model.remote = RemoteForward(session, reward_source(model, options.device, options.cache_dir))
        try:
            yield
        finally:
            reward_model.remote = None


def _scoring_input(data: Table, options: ScoreOptions, model_name: str, inputs: dict[str, Any], name: Any) -> tuple:
    """(frame, its provenance history, the new history entry) of the table to score (``data``: its local
    copy when ``name`` is a remote URI)."""

    parameters = {"model": model_name, "responses": options.responses, "batch_size": options.batch_size}
    if options.responses:
        frame = raw_lazy(data, **{k: v for k, v in inputs.items() if k in ("split", "config")}).collect()
        path = path_of(data)
        history = read_history(path) if path and path != STDIO and Path(path).suffix == ".parquet" else []
        return frame, history, new_history_entry("score", parameters)
    src = input_table(data, inputs)
    name_input(src, name)
    return src.collect(), src.history, new_history_entry("score", parameters, source=src.source)


def _scored(
    reward_model: Any, frame: pl.DataFrame, options: ScoreOptions, drop_invalid: bool, source: str,
    model_name: str, progress_bar: ProgressBar | None,
) -> pl.DataFrame:
    """``frame`` with the model's rewards, under a progress bar."""
    from prefnoise.reward import score_responses, score_table  # pulls torch: loaded only when a reward model runs

    run = score_responses if options.responses else score_table
    with contextlib.ExitStack() as bars:
        progress = _ScoringProgress(bars, progress_bar or no_bar, frame.height)
        if not hasattr(reward_model, "embed_missing"):
            progress.start("scoring", frame.height)
        return run(reward_model, frame, options.batch_size, device=options.device, drop_invalid=drop_invalid,
                   source=source, model_name=model_name, on_embed_start=progress.embed_start,
                   on_embed=progress.embedded, on_progress=progress.scored)


class _ScoringProgress:
    """score's one bar: "embedding" by texts when embed+mlp's encoder has texts to run on (its time goes
    there), else "scoring" by rows; opened once the count of texts to embed is known."""

    def __init__(self, bars: contextlib.ExitStack, progress_bar: ProgressBar, rows: int) -> None:
        self.bars, self.progress_bar, self.rows = bars, progress_bar, rows
        self.advance: Callable[[int], None] | None = None
        self.embedding = False

    def start(self, description: str, total: int) -> None:
        """Open the bar (once)."""
        if self.advance is None:
            self.advance = self.bars.enter_context(self.progress_bar(description, total))

    def embed_start(self, texts: int) -> None:
        """The encoder will run on ``texts`` texts (0: all cached)."""
        self.embedding = texts > 0
        self.start(*(("embedding", texts) if self.embedding else ("scoring", self.rows)))

    def embedded(self, n: int) -> None:
        """``n`` more texts embedded."""
        if self.advance is not None and self.embedding:
            self.advance(n)

    def scored(self, n: int) -> None:
        """``n`` more rows scored."""
        if not self.embedding:
            self.start("scoring", self.rows)
            assert self.advance is not None
            self.advance(n)


def _summary(
    source: str, reward_model: Any, scored: pl.DataFrame, model_name: str, rows: int, out: Any, responses: bool,
    started: float,
) -> dict[str, Any]:
    """``score --json``'s object less the agreement and truncation entries (``started``: perf_counter at start)."""
    seen = ("in_training", "in_validation")
    return {
        "input": source,
        "model": model_name,
        "backend": reward_model.backend,
        "rows": rows,
        "output": output_name(out),
        "columns": [C.REWARD] if responses else [c for c in scored.columns if c.endswith(C.REWARD) or c in seen],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _with_truncation(result: ScoreResult) -> ScoreResult:
    """``result`` with its count of sequences cut to max_length and the one-line note on them."""
    from prefnoise.reward.tokens import describe_truncation  # heavy: torch

    truncation = getattr(result.model, "truncation", [])
    result.summary["truncated_sequences"] = sum(s["truncated"] for s in truncation)
    result.truncation_note = describe_truncation(truncation, result.model.config.get("max_length") or 0, saved=True)
    return result
