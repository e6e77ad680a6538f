"""pn.fit_reward: fit a reward model on a pairs table (the `fit-reward` command)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefnoise import columns as C
from prefnoise.api.tables import Table, input_table, path_of, split_options
from prefnoise.data import new_history_entry
from prefnoise.options.fit_reward import FitRewardConfig
from prefnoise.options.training import INPUT_DEFAULTS, keyword_signature
from prefnoise.outputs import check_output_dir, releases_outputs

CALLBACKS = ("on_epoch", "on_embed_start", "on_embed")  # besides on_start and on_progress


@dataclass
class FitRewardResult:
    """``pn.fit_reward``'s result: the trained ``model`` (score it with :func:`score`), the training
    ``fit`` (metrics, pair splits) and ``summary`` (``fit-reward --json``'s object)."""

    model: Any
    fit: Any
    summary: dict[str, Any]


@releases_outputs
def fit_reward(data: Table, out: str | Path | None = None, *, options: FitRewardConfig | None = None,
               overwrite: bool = False, on_start: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None, **keywords: Any) -> FitRewardResult:
    """``prefnoise fit-reward``: train a reward model r(prompt, response) with a margin loss.

    The options are :class:`~prefnoise.options.fit_reward.FitRewardConfig`'s fields, as keywords or as
    ``options`` (``model``: None (the mlp on feature columns), "mlp", "embed+mlp" with ``encoder``, or a
    local HF model directory or cached hub id), besides the input options (``prompt_col``, ``layout``,
    ``drop_invalid``, ...). With ``out`` the model directory is written as the CLI writes it; with
    ``save_every``, ``resume`` or ``report_to`` the run writes into ``out`` as it trains.
    ``on_start``/``on_progress`` (and ``on_epoch``, ``on_embed_start``, ``on_embed``) follow training
    (see :class:`prefnoise.reward.task.Callbacks`).
    """
    from prefnoise.reward.backend import backend_of  # heavy: prefnoise.reward loads torch
    from prefnoise.reward.fitting import fit_reward_model, save_reward_model  # heavy: torch

    callbacks = {k: keywords.pop(k) for k in CALLBACKS if k in keywords}
    input_options, fit_options = split_options(keywords, others="FitRewardConfig")
    if options is not None and fit_options:
        raise TypeError(f"pass options= or keyword options, not both (got {', '.join(fit_options)})")
    config = options or FitRewardConfig(drop_invalid=input_options.get("drop_invalid", False), **fit_options)
    if out is not None:
        inputs = [path_of(data), config.model, config.encoder, config.cache_dir]
        state = check_output_dir(out, command="fit-reward", inputs=inputs, overwrite=overwrite, resume=config.resume)
        if config.resume and not overwrite:  # both: continue a checkpoint if there is one, else replace
            from prefnoise.training.runs import check_resumable  # heavy: prefnoise.training loads torch

            check_resumable(out, state, "fit-reward")
    src = input_table(data, {**input_options, "drop_invalid": config.drop_invalid})
    frame = src.collect()
    backend, model_path = backend_of(config.model, C.chosen(C.FEATURES) in frame.columns)
    config = dataclasses.replace(config, model=model_path or backend)
    parameters = {"backend": backend, **{k: v for k, v in dataclasses.asdict(config).items() if k != "cache_dir"}}
    entry = new_history_entry("fit-reward", parameters, seed=config.seed, source=src.source)
    writes_as_it_trains = bool(config.save_every or config.resume or config.report_to != "none")
    fit = fit_reward_model(frame, config, source=src.name, run_dir=out if writes_as_it_trains else None,
                           on_start=on_start, on_progress=on_progress, **callbacks)
    summary = {"input": src.name, "output": None if out is None else str(out), "rows": frame.height,
               **{k: v for k, v in fit.metrics.items() if k != "epochs"}}
    if out is not None and fit.is_main:  # other data-parallel processes: the main one writes
        save_reward_model(fit, out, history=[*src.history, entry.to_dict(rows_out=frame.height)])
    return FitRewardResult(fit.model, fit, summary)


fit_reward.__signature__ = keyword_signature(fit_reward, FitRewardConfig, inputs=INPUT_DEFAULTS)  # type: ignore[attr-defined]
