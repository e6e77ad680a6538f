"""pn.score: add a reward model's rewards to a table (the `score` command)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.fitting import FitRewardResult
from prefnoise.api.tables import (
    STDIO,
    ProgressBar,
    Table,
    _kind,
    check_api_options,
    gather_input_options,
    input_table,
    no_bar,
    output_name,
    path_of,
    raw_lazy,
    table_label,
)
from prefnoise.errors import PrefnoiseError


@dataclass
class ScoreResult:
    """``pn.score``'s result: the table with rewards, the model used, and the summary."""

    table: pl.DataFrame
    model: Any
    summary: dict[str, Any]
    truncation_note: str | None = None  # one line on the sequences cut to max_length (None when none)


def _reward_model(model: Any, cache_dir: str | Path | None) -> tuple[Any, Any, str]:
    """(RewardModel, training pair splits or None, its name) from a path, hub id, fit result or model."""
    from prefnoise.heldout import read_training_pairs
    from prefnoise.reward import RewardModel, load_reward_model

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


def score(
    model: Any,
    data: Table,
    out: str | Path | None = None,
    *,
    responses: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> ScoreResult:
    """``prefnoise score``: add ``chosen_reward``/``rejected_reward`` (``reward`` with ``responses``).

    ``model``: a directory written by ``fit-reward``, a plain sequence-classification model directory or
    hub id (num_labels=1, as TRL's RewardTrainer saves it), or what :func:`fit_reward` returned. Rows the
    model trained or validated on are marked (``in_training``/``in_validation``). ``summary`` is ``score
    --json``'s object (agreement with the labels, held out where known).
    """
    from prefnoise.data import new_history_entry, read_history, write_table
    from prefnoise.heldout import agreement_summary, mark_seen
    from prefnoise.outputs import check_output_file
    from prefnoise.reward import score_responses, score_table
    from prefnoise.reward.models import describe_truncation

    check_api_options(locals())
    model_input = str(model) if isinstance(model, str | Path) else None
    if out is not None:
        check_output_file(out, inputs=[model_input, path_of(data)], overwrite=overwrite)
    started = time.perf_counter()
    reward_model, splits, model_name = _reward_model(model, cache_dir)
    parameters = {"model": model_name, "responses": responses, "batch_size": batch_size}
    if responses:
        hub = {k: v for k, v in input_options.items() if k in ("split", "config")}
        frame = raw_lazy(data, **hub).collect()
        path = path_of(data)
        history = read_history(path) if path and path != STDIO and Path(path).suffix == ".parquet" else []
        entry = new_history_entry("score", parameters)
        run = score_responses
    else:
        src = input_table(
            data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
        )
        frame = src.collect()
        history = src.history
        entry = new_history_entry("score", parameters, source=src.source)
        run = score_table
    # embed+mlp spends its time in the encoder (texts not in the embedding cache): the bar follows that
    misses = _texts_to_embed(reward_model, frame, responses)
    with (progress_bar or no_bar)(*(("embedding", misses) if misses else ("scoring", frame.height))) as advance:
        progress = {"on_embed": advance} if misses else {"on_progress": advance}
        scored = run(reward_model, frame, batch_size, device=device, drop_invalid=drop_invalid,
                     source=table_label(data), model_name=model_name, **progress)
    if splits is not None and not responses:
        scored = mark_seen(scored, splits)  # in_training / in_validation travel on to rank-check --group-by
    rows = write_table(scored, out, entry=entry, history=history, overwrite=overwrite) if out else scored.height
    elapsed = time.perf_counter() - started
    seen = ("in_training", "in_validation")
    summary: dict[str, Any] = {
        "input": table_label(data),
        "model": model_name,
        "backend": reward_model.backend,
        "rows": rows,
        "output": output_name(out),
        "columns": [C.REWARD] if responses else [c for c in scored.columns if c.endswith(C.REWARD) or c in seen],
        "seconds": round(elapsed, 3),
    }
    if not responses:
        summary.update(agreement_summary(scored))
    truncation = getattr(reward_model, "truncation", [])
    summary["truncated_sequences"] = sum(s["truncated"] for s in truncation)
    cut = describe_truncation(truncation, reward_model.config.get("max_length") or 0)
    return ScoreResult(scored, reward_model, summary, cut)


def _texts_to_embed(reward_model: Any, frame: pl.DataFrame, responses: bool) -> int:
    """How many texts scoring ``frame`` makes an embed+mlp model's encoder run (0 for other backends)."""
    if not hasattr(reward_model, "to_embed") or C.PROMPT not in frame.columns:
        return 0
    prompts = frame[C.PROMPT].to_list()
    if responses:
        return reward_model.to_embed(prompts, frame["response"].to_list()) if "response" in frame.columns else 0
    if C.CHOSEN not in frame.columns or C.REJECTED not in frame.columns:
        return 0
    return reward_model.to_embed(prompts + prompts, frame[C.CHOSEN].to_list() + frame[C.REJECTED].to_list())
