"""Fit a reward model on preference pairs with a margin loss (``fit-reward``), and save it.

The run is :class:`prefnoise.training.run.Run` (accelerator, run directory, resume, metrics log,
trackers, checkpoints); the reward task (:mod:`prefnoise.reward.task`) supplies the model, its batches,
loss and validation; the epochs are here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import pair_splits, write_training_pairs
from prefnoise.options.fit_reward import RESUME_FREE, FitRewardConfig, fit_reward_config
from prefnoise.outputs import output_dir_state
from prefnoise.reward.models import RewardModel
from prefnoise.reward.task import Callbacks, EpochState, RewardTask, data_digest
from prefnoise.reward.validate import DROP_REASON, check_finite_features
from prefnoise.training import CHECKPOINTS_DIR, TRACKER_DIR, learning_rate
from prefnoise.training import METRICS_FILE as RECORDS_FILE
from prefnoise.training.loop import Cadence, fit
from prefnoise.training.run import Run, RunSpec

METRICS_FILE = "metrics.json"
FIT_REWARD = "fit-reward"  # the marker of fit-reward's output directory
HISTORY_FILE = "history.json"


@dataclass
class FitResult:
    """The trained model, its metrics (per-epoch rows and the final validation numbers), and rank."""

    model: RewardModel
    metrics: dict[str, Any]
    is_main: bool = True
    pair_splits: pl.DataFrame | None = None  # (pair_id, split): the pairs that trained and validated it
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl: train steps and evaluations


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``, with a
    linear warmup over the first round(warmup·total) steps (:func:`prefnoise.training.learning_rate`)."""
    return learning_rate(step, total, 1.0, schedule, round(warmup * total))


def fit_reward_model(df: pl.DataFrame, config: FitRewardConfig | None = None, *, network: RewardModel | None = None,
                     source: str = "data", run_dir: str | Path | None = None, **options: Any) -> FitResult:
    """Train a reward model on ``df`` (canonical table) as ``config`` says; return it and its metrics.

    ``config``: a :class:`~prefnoise.options.fit_reward.FitRewardConfig`, or its fields as keywords
    (also ``backend``/``model_path``/``encoder_path``/``loss_params``), besides the callbacks of
    :class:`~prefnoise.reward.task.Callbacks`. ``network``: a freshly built reward model to train
    instead of the config's (``reproduce synthetic --source mnist`` passes the paper's CNN).

    Feature vectors (mlp) must be finite: a null, NaN or ±inf entry raises PrefnoiseError naming
    ``source``, or with ``drop_invalid`` drops the row (counted in ``metrics["dropped"]``). Training
    stops with PrefnoiseError as soon as the loss, a weight or the validation rewards turn non-finite.
    ``run_dir`` (the output directory) receives metrics.jsonl as training goes, a checkpoint every
    ``save_every`` optimizer steps (``resume`` continues from the newest one exactly) and the trackers'
    logs (``runs/``).
    """
    callbacks = Callbacks(**{k: options.pop(k) for k in list(options) if k in Callbacks.__dataclass_fields__})
    config = (config or fit_reward_config(**options)).for_backend()
    if (config.save_every or config.resume) and run_dir is None:
        raise PrefnoiseError("--save-every and --resume need an output directory (--out) for the checkpoints")
    if C.PAIR_ID not in df.columns:
        raise PrefnoiseError("table has no pair_id column; read it with prefnoise.data.read_table")
    dropped = 0
    if config.backend == "mlp":  # the one backend that reads feature columns
        df, dropped = check_finite_features(df, source, config.drop_invalid,
                                            columns=(C.chosen(C.FEATURES), C.rejected(C.FEATURES)))
    options_now = {k: v for k, v in asdict(config).items() if k not in ("cache_dir",)}
    run = Run(RunSpec(FIT_REWARD, options_now, free=RESUME_FREE), run_dir, device=config.device,
              precision=config.precision, report_to=config.report_to, resume=config.resume)
    digest = data_digest(df) if config.save_every or config.resume else None
    run.check_options()
    run.check_same("data", digest, "data", lambda saved, now: "other pairs, text or labels",
                   "use the same data or start over with --overwrite")
    task = RewardTask(config, df, run, network, callbacks)
    task.make_trainer()
    steps = train_epochs(task, digest)
    task.finish()
    return FitResult(model=task.model, metrics=fit_metrics(task, steps, dropped), is_main=run.main,
                     pair_splits=pair_splits(df[C.PAIR_ID], task.train_index, task.val_index),
                     records=run.log.records)


def train_epochs(task: RewardTask, digest: str | None) -> int:
    """Run ``task``'s epochs in the one training loop (from its checkpoint when resuming); return the
    optimizer steps done."""
    config, run, callbacks = task.config, task.run, task.callbacks
    run.start()
    task.start_step = start = run.restore()
    task.epochs, task.digest = EpochState.from_checkpoint(run.saved, run.resume_from), digest
    run.open_trackers()
    if callbacks.on_start is not None:
        callbacks.on_start(config.epochs * task.per_rank)
        if start and callbacks.on_progress is not None:
            callbacks.on_progress(min(start * config.batch_size * config.grad_accum, config.epochs * task.per_rank))
    return fit(task, run, Cadence(config.log_every, save_every=config.save_every), start)


def fit_metrics(task: RewardTask, steps: int, dropped: int) -> dict[str, Any]:
    """metrics.json of a finished run of ``steps`` optimizer steps (also what ``fit-reward --json`` reports)."""
    config, state, model = task.config, task.epochs, task.model
    history = state.history
    final = dict(history[state.best_epoch - 1] if state.best_state is not None else history[-1])
    model.config = {**model.config, "loss": config.loss, "loss_params": config.loss_params,
                    "margin_scale": config.margin_scale}
    settings = {name: getattr(config, name) for name in (
        "epochs", "batch_size", "lr", "weight_decay", "val_fraction", "seed", "early_stopping", "max_length",
        "schedule", "warmup", "grad_accum", "max_grad_norm", "precision", "lora_r")}
    settings["max_length"] = config.max_length if config.backend != "mlp" else None
    return {
        "backend": config.backend, "loss": config.loss, "loss_params": config.loss_params,
        "margin_scale": config.margin_scale, "epochs": history, "final": final,
        "stopped_epoch": history[-1]["epoch"], "best_epoch": state.best_epoch or history[-1]["epoch"],
        "train_pairs": int(len(task.train_index)), "val_pairs": int(len(task.val_index)),
        "dropped": {DROP_REASON: dropped} if dropped else {},
        "truncated_sequences": sum(s["truncated"] for s in getattr(model, "truncation", [])),
        "device": str(task.runtime.device), "processes": task.runtime.world, "optimizer_steps": steps,
        "resumed_from_step": task.start_step if task.run.resume_from is not None else None,
        "settings": settings,
    }


def save_reward_model(result: FitResult, directory: str | Path, *, history: list[dict[str, Any]]) -> Path:
    """Write model, config, metrics.json, metrics.jsonl, history.json and the trained/validated pair_ids
    (training_pairs.parquet) into ``directory`` atomically; return it.

    An earlier fit-reward output there is replaced, except its tracker logs (``runs/``), which move over.
    """
    directory = Path(directory)
    with atomic_path(directory, directory=True, command=FIT_REWARD) as tmp:
        result.model.save(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in result.records), encoding="utf-8")
        (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str) + "\n", encoding="utf-8")
        if result.pair_splits is not None:
            write_training_pairs(result.pair_splits, tmp)
        logs = directory / TRACKER_DIR
        if logs.is_dir() and output_dir_state(directory, FIT_REWARD) == "ours":
            shutil.move(logs, tmp / TRACKER_DIR)
    return directory


__all__ = ["CHECKPOINTS_DIR", "FitResult", "fit_reward_model", "lr_factor", "save_reward_model"]
