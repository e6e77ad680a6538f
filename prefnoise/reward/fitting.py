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

import numpy as np
import polars as pl
import torch

from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import pair_splits, write_training_pairs
from prefnoise.options.fit_reward import RESUME_FREE, FitRewardConfig, fit_reward_config
from prefnoise.outputs import output_dir_state
from prefnoise.reward.models import RewardModel
from prefnoise.reward.task import Callbacks, EpochState, RewardTask, data_digest, mean_over_ranks
from prefnoise.reward.validate import DROP_REASON, check_finite_features
from prefnoise.training import CHECKPOINTS_DIR, TRACKER_DIR, learning_rate
from prefnoise.training import METRICS_FILE as RECORDS_FILE
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
    state = train_epochs(task, digest)
    task.finish(state)
    return FitResult(model=task.model, metrics=fit_metrics(task, state, dropped), is_main=run.main,
                     pair_splits=pair_splits(df[C.PAIR_ID], task.train_index, task.val_index),
                     records=run.log.records)


def train_epochs(task: RewardTask, digest: str | None) -> EpochState:
    """Run the epochs of ``task`` (from its checkpoint when resuming); return where training ended."""
    config, run, callbacks = task.config, task.run, task.callbacks
    run.start()
    start_step = run.restore()
    state = EpochState.from_checkpoint(run.saved, run.resume_from)
    run.open_trackers()
    if callbacks.on_start is not None:
        callbacks.on_start(config.epochs * task.per_rank)
        if start_step and callbacks.on_progress is not None:
            callbacks.on_progress(min(start_step * config.batch_size * config.grad_accum,
                                      config.epochs * task.per_rank))
    task.start_step, task.step = start_step, 0
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(1, config.epochs + 1):
        order = task.train_index[torch.randperm(len(task.train_index), generator=generator).numpy()]
        task.step = (epoch - 1) * task.steps_per_epoch
        if len(state.history) >= epoch:  # done and validated before the checkpoint: only replay the shuffle
            task.step = epoch * task.steps_per_epoch
            continue
        total, count = train_epoch(task, epoch, order, state, digest)
        task.trainer.watch.check(task.net)  # the epoch's last updates, or a non-finite gradient, before validation
        row: dict[str, Any] = {"epoch": epoch, "train_loss": mean_over_ranks(total, count, task.runtime)}
        task.evaluate(epoch, task.step, row)
        state.history.append(row)
        if callbacks.on_epoch is not None:
            callbacks.on_epoch(row)
        if early_stop(task, state, row):
            break
        if config.save_every and task.step % config.save_every == 0 and task.step != task.total_steps:
            task.checkpoint(task.step, state, total, count, digest)
    return state


def train_epoch(task: RewardTask, epoch: int, order: np.ndarray, state: EpochState, digest: str | None
                ) -> tuple[float, int]:
    """The optimizer steps of epoch ``epoch``; return its summed loss and pair count (this process's)."""
    config, callbacks = task.config, task.callbacks
    task.net.train()
    batches = task.epoch_batches(order, epoch)
    resumed_inside = task.step < task.start_step  # its running loss comes from the checkpoint
    total, count = (state.epoch_total, state.epoch_count) if resumed_inside else (0.0, 0)
    epoch_end = epoch * task.steps_per_epoch
    for first in range(0, len(batches), config.grad_accum):
        group = batches[first : first + config.grad_accum]
        if task.step < task.start_step:
            task.step += 1
            continue
        pairs = sum(len(rows) for rows in group)
        losses, margins = task.trainer.step(task.step, group, task.compute, [pairs / len(rows) for rows in group])
        task.step += 1
        step_loss = torch.cat(losses).float()
        total += float(step_loss.sum())  # the one sync per step
        count += pairs
        if callbacks.on_progress is not None:
            callbacks.on_progress(pairs)
        if task.step % config.log_every == 0 or task.step == epoch_end:
            task.trainer.watch.check()  # a non-finite loss or gradient is never logged
            task.run.log(task.train_record(task.step, step_loss, margins))
        if config.save_every and task.step % config.save_every == 0 and task.step not in (task.total_steps,
                                                                                             epoch_end):
            task.checkpoint(task.step, state, total, count, digest)  # inside the epoch (its end: after validation)
    return total, count


def early_stop(task: RewardTask, state: EpochState, row: dict[str, Any]) -> bool:
    """Keep the best weights by validation loss; True once ``early_stopping`` epochs brought no better one."""
    if task.config.early_stopping is None:
        return False
    if row["val_loss"] < state.best_loss:
        state.best_loss, state.best_epoch, state.patience = row["val_loss"], row["epoch"], 0
        state.best_state = {k: v.detach().clone() for k, v in task.model.module.state_dict().items()}
        return False
    state.patience += 1
    return state.patience >= task.config.early_stopping


def fit_metrics(task: RewardTask, state: EpochState, dropped: int) -> dict[str, Any]:
    """metrics.json of a finished run (also what ``fit-reward --json`` reports)."""
    config, history, model = task.config, state.history, task.model
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
        "device": str(task.runtime.device), "processes": task.runtime.world, "optimizer_steps": task.step,
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
