"""pn.fit_reward: fit a reward model on a pairs table (the `fit-reward` command)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefnoise import columns as C
from prefnoise.api.tables import (
    Table,
    check_api_options,
    gather_input_options,
    input_table,
    path_of,
    split_options,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import releases_outputs


@dataclass
class FitRewardResult:
    """``pn.fit_reward``'s result: the trained ``model`` (score it with :func:`score`), the training
    ``fit`` (metrics, pair splits) and ``summary`` (``fit-reward --json``'s object)."""

    model: Any
    fit: Any
    summary: dict[str, Any]


@releases_outputs
def fit_reward(
    data: Table,
    out: str | Path | None = None,
    *,
    loss: str = "sigmoid",
    model: str | None = None,
    encoder: str | None = None,
    margin_scale: float = 1.0,
    eps: float | None = None,
    tau: float | None = None,
    alpha: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    early_stopping: int | None = None,
    device: str = "auto",
    max_length: int | None = None,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
    output_clip: float = 20.0,
    cache_dir: str | Path | None = None,
    embed_features: str | None = None,
    head: str | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    precision: str = "auto",
    lora_r: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    log_every: int = 10,
    save_every: int = 0,
    resume: bool = False,
    report_to: str = "none",
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> FitRewardResult:
    """``prefnoise fit-reward``: train a reward model r(prompt, response) with a margin loss.

    ``model``: None (the mlp on feature columns), "mlp", "embed+mlp" (with ``encoder``) or a local HF model
    directory or hub id. With ``out`` the model directory is written as the CLI writes it. Further keyword
    options are input options (see :func:`input_option_names`) or go to
    :func:`prefnoise.reward.fit_reward_model`. ``on_start``/``on_progress``/``on_epoch`` follow training.
    With ``save_every``, ``resume`` or ``report_to`` the run writes into ``out`` as it trains (checkpoints,
    metrics.jsonl, tracker logs under runs/), as align does.
    """
    from prefnoise.data import new_history_entry
    from prefnoise.loss_names import MARGIN_LOSS_NAMES, MARGIN_RATE_PARAMS, missing_rate
    from prefnoise.outputs import check_output_dir
    from prefnoise.reward import fit_reward_model, save_reward_model
    from prefnoise.reward.backend import backend_of

    check_api_options(locals())
    if loss not in MARGIN_LOSS_NAMES:
        raise PrefnoiseError(f"unknown --loss {loss!r}; choose one of: {', '.join(MARGIN_LOSS_NAMES)}")
    missing = missing_rate(loss, {"eps": eps}, MARGIN_RATE_PARAMS)
    if missing:
        raise PrefnoiseError(missing)
    if encoder is not None and model != "embed+mlp":
        raise PrefnoiseError("--encoder applies to --model embed+mlp only")
    if embed_features is not None and model != "embed+mlp":
        raise PrefnoiseError("--embed-features applies to --model embed+mlp only")
    if head is not None and head not in ("sequence-classification", "pooled"):
        raise PrefnoiseError(f"--head must be sequence-classification or pooled, got {head!r}")
    if out is not None:
        check_output_dir(
            out, command="fit-reward", inputs=[path_of(data), model, encoder, cache_dir], overwrite=overwrite,
            resume=resume,
        )
    input_options, fit_options = split_options(options, others="fit_reward_model")
    src = input_table(
        data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
    )
    frame = src.collect()
    backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
    options = {
        "loss": loss,
        "backend": backend,
        "model_path": model_path,
        "encoder_path": encoder,
        "loss_params": {"eps": eps, "tau": tau, "alpha": alpha},
        "margin_scale": margin_scale,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "val_fraction": val_fraction,
        "early_stopping": early_stopping,
        "device": device,
        "max_length": max_length,
        "hidden": hidden,
        "layers": layers,
        "dropout": dropout,
        "output_clip": output_clip if output_clip > 0 else None,
        "cache_dir": cache_dir,
        "embed_features": embed_features,
        "head": head,
        "schedule": schedule,
        "warmup": warmup,
        "grad_accum": grad_accum,
        "max_grad_norm": max_grad_norm,
        "precision": precision,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "log_every": log_every,
        "save_every": save_every,
        "resume": resume,
        "report_to": report_to,
        **fit_options,
    }
    entry = new_history_entry(
        "fit-reward", {k: v for k, v in options.items() if k != "cache_dir"}, seed=seed, source=src.source
    )
    callbacks = {k: v for k, v in (("on_start", on_start), ("on_progress", on_progress), ("on_epoch", on_epoch)) if v}
    writes_as_it_trains = bool(save_every or resume or report_to != "none")
    run_dir = out if out is not None and writes_as_it_trains else None
    fit = fit_reward_model(frame, seed=seed, drop_invalid=drop_invalid, source=src.name, run_dir=run_dir,
                           **options, **callbacks)
    summary = {
        "input": src.name,
        "output": None if out is None else str(out),
        "rows": frame.height,
        **{k: v for k, v in fit.metrics.items() if k != "epochs"},
    }
    if out is not None and fit.is_main:  # other data-parallel processes: the main one writes
        save_reward_model(fit, out, history=[*src.history, entry.to_dict(rows_out=frame.height)])
    return FitRewardResult(fit.model, fit, summary)
