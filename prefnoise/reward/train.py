"""Fit a reward model on preference pairs with a margin loss, and score tables with it.

The loss sees the margin z = β·(r(chosen) − r(rejected)); the label is always "chosen is better",
so a flipped pair is simply a pair whose z should be negative. The training loop is one function.
Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) it runs data-parallel (DDP): every
process takes its share of each epoch's batches, validation runs everywhere on the whole split,
and only the main process should write results (``FitResult.is_main``).

Numbers stay finite: NaN/inf feature vectors are refused (or dropped with ``drop_invalid``) before
training or scoring, a run stops with PrefnoiseError as soon as its loss, weights or validation
margins turn non-finite, and scoring refuses a model whose rewards are NaN or inf.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.batching import group_order, longest_first
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import pair_splits, write_training_pairs
from prefnoise.loss_names import MARGIN_RATE_PARAMS, missing_rate
from prefnoise.losses import get_margin_loss
from prefnoise.reward.models import (
    RewardModel,
    new_embed_mlp,
    new_mlp,
    new_transformer,
)
from prefnoise.reward.split import split_by_pair_id
from prefnoise.reward.validate import (
    DROP_REASON,
    check_finite_features,
    check_finite_number,
    nonfinite_name,
)
from prefnoise.training import (
    CHECKPOINTS_DIR,
    PRECISIONS,
    SCHEDULES,
    TRACKER_DIR,
    MetricsLog,
    Trainer,
    changed_options,
    check_report_to,
    latest_checkpoint,
    learning_rate,
    make_accelerator,
    read_trainer_state,
    reshard,
    resolve_device,
    save_checkpoint,
    start_trackers,
    truncate_metrics,
)
from prefnoise.training import METRICS_FILE as RECORDS_FILE

Progress = Callable[[int], None]

# Per-backend training defaults; the mlp row follows the paper's synthetic runs (Adam 1e-3, batch 512).
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 50, "batch_size": 512, "lr": 1e-3, "max_length": 512},
    "embed+mlp": {"epochs": 50, "batch_size": 512, "lr": 1e-3, "max_length": 256},
    "transformer": {"epochs": 1, "batch_size": 8, "lr": 2e-5, "max_length": 512},
}
# Learning-rate schedule per backend: (schedule, warmup share of the steps). Fine-tuning a pretrained
# transformer takes the usual linear warmup and linear decay to 0; the MLPs keep a constant rate.
SCHEDULE_DEFAULTS: dict[str, tuple[str, float]] = {
    "mlp": ("constant", 0.0),
    "embed+mlp": ("constant", 0.0),
    "transformer": ("linear", 0.1),
}
# Gradient clipping per backend: the paper's MLP runs do not clip; fine-tuning clips at 1.0 as TRL does.
MAX_GRAD_NORM_DEFAULTS = {"mlp": 0.0, "embed+mlp": 0.0, "transformer": 1.0}
# Options that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("device", "save_every", "log_every", "report_to", "cache_dir", "resume", "run_dir")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``, with a
    linear warmup over the first round(warmup·total) steps (:func:`prefnoise.training.learning_rate`)."""
    return learning_rate(step, total, 1.0, schedule, round(warmup * total))


METRICS_FILE = "metrics.json"
BEST_STATE = "best_state.pt"  # a checkpoint's early-stopping snapshot (torch.save of a state dict)
FIT_REWARD = "fit-reward"  # the marker of fit-reward's output directory
HISTORY_FILE = "history.json"
EVAL_BATCH = {"mlp": 8192, "embed+mlp": 8192, "transformer": 32}


@dataclass
class FitResult:
    """The trained model, its metrics (per-epoch rows and the final validation numbers), and rank."""

    model: RewardModel
    metrics: dict[str, Any]
    is_main: bool = True
    pair_splits: pl.DataFrame | None = None  # (pair_id, split): the pairs that trained and validated it
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl: train steps and evaluations


@dataclass
class _Runtime:
    """Device and data-parallel layout of this process."""

    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


def _runtime(device: str) -> _Runtime:
    """This (single) process's device for scoring, with bf16 autocast on CUDA (training takes its
    layout from :func:`prefnoise.training.make_accelerator`)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return _Runtime(dev, autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    return _Runtime(dev)


def _features(df: pl.DataFrame, column: str) -> np.ndarray | None:
    """float32 (n, d) array of the fixed-size vectors in ``column`` (None when absent)."""
    if column not in df.columns:
        return None
    series = df[column]
    if series.null_count():
        raise PrefnoiseError(f"column {column!r} has {series.null_count()} null vectors; fill or drop those rows")
    if isinstance(series.dtype, pl.List):
        lengths = series.list.len().unique()
        if lengths.len() != 1:
            raise PrefnoiseError(f"column {column!r}: vectors have different lengths {sorted(lengths.to_list())[:5]}")
        series = series.list.to_array(int(lengths[0]))
    if not isinstance(series.dtype, pl.Array):
        raise PrefnoiseError(f"column {column!r} must hold fixed-size float vectors, not {series.dtype}")
    return series.to_numpy().astype(np.float32, copy=False)


def build_reward_model(
    df: pl.DataFrame,
    *,
    backend: str,
    model_path: str | Path | None = None,
    encoder_path: str | Path | None = None,
    max_length: int,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
    output_clip: float | None = 20.0,
    cache_dir: str | Path | None = None,
    embed_features: str | Sequence[str] | None = None,
    head: str | None = None,
) -> RewardModel:
    """A freshly initialised reward model of ``backend`` sized for table ``df``.

    ``embed_features``: embed+mlp's feature parts; ``head``: the transformer's scalar head
    (sequence-classification or pooled; None picks by architecture)."""
    if backend == "mlp":
        features = _features(df, C.chosen(C.FEATURES))
        if features is None:
            raise PrefnoiseError(
                "--model mlp needs chosen_features/rejected_features columns; for text use "
                "--model PATH (a local HF model) or --model embed+mlp --encoder PATH"
            )
        return new_mlp(features.shape[1], hidden=hidden, layers=layers, dropout=dropout, output_clip=output_clip)
    if backend == "embed+mlp":
        if encoder_path is None:
            raise PrefnoiseError("--model embed+mlp needs --encoder PATH (a local HF encoder directory)")
        return new_embed_mlp(
            encoder_path,
            max_length=max_length,
            hidden=hidden,
            layers=layers,
            dropout=dropout,
            output_clip=output_clip,
            cache_dir=cache_dir,
            embed_features=embed_features,
        )
    if backend == "transformer":
        if model_path is None:
            raise PrefnoiseError("the transformer backend needs --model PATH (a local HF model directory)")
        return new_transformer(model_path, max_length=max_length, output_clip=output_clip, head=head)
    raise PrefnoiseError(f"unknown backend {backend!r}; use mlp, embed+mlp or a model directory")


def _prompt_messages(model: RewardModel, df: pl.DataFrame) -> dict[str, Any]:
    """``prompt_messages=`` for ``model.prepare`` when the table is conversational (transformer backend)."""
    if model.backend != "transformer" or C.PROMPT_MESSAGES not in df.columns:
        return {}
    return {"prompt_messages": df[C.PROMPT_MESSAGES].to_list()}


def _prepare_sides(
    model: RewardModel,
    df: pl.DataFrame,
    device: torch.device,
    on_progress: Progress | None,
    on_embed_start: Callable[[int], None] | None = None,
) -> list[Any]:
    """Prepared inputs of the chosen and the rejected responses of every row.

    Text backends leave what they had to cut in ``model.truncation`` (a list, one entry per side).
    embed+mlp first announces ``on_embed_start(total)``, the texts the encoder must run on (cache
    misses of both sides), and then advances ``on_progress`` by the texts embedded.
    """
    prompts = df[C.PROMPT].to_list()
    if on_embed_start is not None and hasattr(model, "to_embed"):
        on_embed_start(model.to_embed(prompts + prompts, df[C.CHOSEN].to_list() + df[C.REJECTED].to_list()))
    wants_features = model.backend == "mlp"
    chat = _prompt_messages(model, df)
    sides, truncation = [], []
    for side in (C.CHOSEN, C.REJECTED):
        sides.append(
            model.prepare(
                prompts,
                df[side].to_list(),
                _features(df, f"{side}_{C.FEATURES}") if wants_features else None,
                device=device,
                on_progress=on_progress,
                **chat,
            )
        )
        if getattr(model, "last_truncation", None) is not None:
            truncation.append(dict(model.last_truncation))
    model.truncation = truncation
    return sides


def _batches(index: np.ndarray, size: int, lengths: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Batches of positions into ``index``: consecutive, or (given each row's ``lengths``) longest first,
    so that a text backend pads little (``prefnoise.batching.longest_first``; callers put results back
    by position)."""
    if lengths is None:
        for start in range(0, len(index), size):
            yield np.arange(start, min(start + size, len(index)))
        return
    for batch in longest_first(range(len(index)), [lengths[i] for i in index], size):
        yield np.asarray(batch, dtype=np.int64)


def _side_lengths(model: RewardModel, sides: Sequence[Any]) -> list[int] | None:
    """Per row, the padded width of its sides (the longest side's tokens) for a text backend, else None
    (feature vectors have no padding)."""
    if model.backend != "transformer" or not sides or not isinstance(sides[0], list):
        return None
    return [max(len(side[i]) for side in sides) for i in range(len(sides[0]))]


def _train_batches(mine: np.ndarray, size: int, lengths: Sequence[int] | None, seed: int, epoch: int
                   ) -> Iterator[np.ndarray]:
    """One epoch's training batches of rows ``mine`` (already shuffled): consecutive, or for a text
    backend grouped by length (``prefnoise.batching.group_order``: megabatches of 50 batches in the
    shuffled order, sorted by length, cut, the batches shuffled by (seed, epoch)). Every row once."""
    if lengths is None:
        for start in range(0, len(mine), size):
            yield mine[start : start + size]
        return
    for batch in group_order(mine.tolist(), lengths, size, seed, epoch):
        yield np.asarray(batch, dtype=np.int64)


@torch.no_grad()
def _pair_rewards(
    model: RewardModel,
    sides: Sequence[Any],
    index: np.ndarray,
    runtime: _Runtime,
    batch_size: int,
    on_progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) float32 CPU rewards of rows ``index``, in eval mode."""
    module = model.module
    was_training = module.training
    module.eval()
    chosen, rejected = torch.zeros(len(index)), torch.zeros(len(index))
    for positions in _batches(index, batch_size, _side_lengths(model, sides)):
        rows = index[positions]
        with runtime.autocast():
            rewards = module(**model.batch(sides, rows, runtime.device)).float()
        rewards = rewards.reshape(len(sides), len(rows)).cpu()
        chosen[positions] = rewards[0]
        rejected[positions] = rewards[1] if len(sides) > 1 else rewards[0]
        if on_progress is not None:
            on_progress(len(rows))
    module.train(was_training)
    return chosen, rejected


def pairwise_accuracy(margin: Tensor, chosen_better: Tensor) -> float:
    """Agreement of the margins' signs with the label, by the project's one rule
    (:func:`prefnoise.metrics.tie_half_accuracy`: a predicted tie counts 1/2)."""
    from prefnoise.metrics import tie_half_accuracy

    sign = np.where(chosen_better.detach().cpu().numpy(), 1.0, -1.0)
    return tie_half_accuracy(margin.detach().float().cpu().numpy(), sign)


def fit_reward_model(
    df: pl.DataFrame,
    *,
    loss: str = "sigmoid",
    backend: str = "mlp",
    model_path: str | Path | None = None,
    encoder_path: str | Path | None = None,
    loss_params: dict[str, float] | None = None,
    margin_scale: float = 1.0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = C.DEFAULT_SEED,
    device: str = "auto",
    early_stopping: int | None = None,
    max_length: int | None = None,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
    output_clip: float | None = 20.0,
    cache_dir: str | Path | None = None,
    drop_invalid: bool = False,
    source: str = "data",
    model: RewardModel | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    embed_features: str | Sequence[str] | None = None,
    head: str | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    on_embed_start: Callable[[int], None] | None = None,
    on_embed: Progress | None = None,
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
    run_dir: str | Path | None = None,
) -> FitResult:
    """Train a reward model on ``df`` (canonical table) with margin loss ``loss``; return it and metrics.

    ``on_start(total)`` announces the number of training pairs to come, ``on_progress(n)``
    advances by pairs trained, ``on_epoch(row)`` receives each epoch's metrics row;
    ``on_embed_start(total)`` / ``on_embed(n)`` do the same for the texts embed+mlp's encoder runs
    on (cache misses only). ``schedule`` (constant, or linear decay) and ``warmup`` (share of the
    steps with a linear warmup) shape the learning rate (:func:`lr_factor`); None takes the
    backend's default (transformer: linear, 0.1; the MLPs: constant, 0). ``embed_features`` and
    ``head``: see :func:`build_reward_model`.

    Feature vectors (mlp) must be finite: a null, NaN or ±inf entry raises PrefnoiseError naming
    ``source`` (the file), the column and the row, or with ``drop_invalid`` drops the row
    (counted in ``metrics["dropped"]``). Training stops with PrefnoiseError as soon as the loss,
    a parameter or the validation rewards become non-finite (nothing is returned to save).
    ``model``: a freshly built reward model of ``backend`` to train instead of the default one
    (``reproduce synthetic --source mnist`` passes the paper's CNN, a feature-vector model).

    The loop is :class:`prefnoise.training.Trainer`, as align's: ``grad_accum`` micro-batches per
    optimizer step, gradients clipped to ``max_grad_norm`` (None: the backend's default, 1.0 for
    transformers as TRL, off for the MLPs as the paper; 0: off), ``precision`` (auto: bf16 autocast on
    a GPU that has it), LoRA adapters on a transformer's linear layers (``lora_r`` > 0; merged into the
    saved weights), data-parallel or FSDP under ``accelerate launch``. ``run_dir`` (the output
    directory) receives ``metrics.jsonl`` as training goes, a checkpoint every ``save_every`` optimizer
    steps (``checkpoints/step-N``; ``resume`` continues from the newest one exactly) and the
    ``report_to`` trackers' logs (``runs/``). A train record is logged every ``log_every`` steps.
    """
    entry = get_margin_loss(loss)
    loss_params = {k: v for k, v in (loss_params or {}).items() if v is not None}
    missing = missing_rate(loss, loss_params, MARGIN_RATE_PARAMS)  # cdpo/rdpo: ε has no default
    if missing:
        raise PrefnoiseError(missing)
    for name, value in loss_params.items():
        check_finite_number(f"--{name}", value)
    entry.fn(torch.zeros(1), **_only(loss_params, entry.params, loss))  # validates params early
    if backend not in BACKEND_DEFAULTS:
        raise PrefnoiseError(f"unknown backend {backend!r}; use mlp, embed+mlp or transformer")
    defaults = BACKEND_DEFAULTS[backend]
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    lr = defaults["lr"] if lr is None else lr
    max_length = defaults["max_length"] if max_length is None else max_length
    schedule = SCHEDULE_DEFAULTS[backend][0] if schedule is None else schedule
    warmup = SCHEDULE_DEFAULTS[backend][1] if warmup is None else warmup
    max_grad_norm = MAX_GRAD_NORM_DEFAULTS[backend] if max_grad_norm is None else max_grad_norm
    if schedule not in SCHEDULES:
        raise PrefnoiseError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    check_finite_number("--warmup", warmup, low=0, high=1)
    check_finite_number("--max-grad-norm", max_grad_norm, low=0)
    check_finite_number("--lora-alpha", lora_alpha, low=0, low_open=True)
    check_finite_number("--lora-dropout", lora_dropout, low=0, high=1)
    if precision not in PRECISIONS:
        raise PrefnoiseError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for flag, value, least in (("--grad-accum", grad_accum, 1), ("--lora-r", lora_r, 0),
                               ("--log-every", log_every, 1), ("--save-every", save_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise PrefnoiseError(f"{flag} must be an integer >= {least}, got {value}")
    if lora_r and backend != "transformer":
        raise PrefnoiseError("--lora-r applies to a transformer --model only (the MLP backends train every weight)")
    check_report_to(report_to, run_dir)
    if (save_every or resume) and run_dir is None:
        raise PrefnoiseError("--save-every and --resume need an output directory (--out) for the checkpoints")
    _check_options(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        margin_scale=margin_scale,
        weight_decay=weight_decay,
        early_stopping=early_stopping,
        val_fraction=val_fraction,
        max_length=max_length,
        hidden=hidden,
        layers=layers,
        dropout=dropout,
        output_clip=output_clip,
    )
    if C.PAIR_ID not in df.columns:
        raise PrefnoiseError("table has no pair_id column; read it with prefnoise.data.read_table")
    dropped = 0
    if backend == "mlp":  # the one backend that reads feature columns
        df, dropped = check_finite_features(
            df, source, drop_invalid, columns=(C.chosen(C.FEATURES), C.rejected(C.FEATURES))
        )

    settings = {
        "loss": loss, "backend": backend, "model_path": None if model_path is None else str(model_path),
        "encoder_path": None if encoder_path is None else str(encoder_path), "loss_params": loss_params,
        "margin_scale": margin_scale, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "val_fraction": val_fraction, "seed": seed, "early_stopping": early_stopping,
        "max_length": max_length if backend != "mlp" else None, "hidden": hidden, "layers": layers,
        "dropout": dropout, "output_clip": output_clip, "embed_features": embed_features, "head": head,
        "schedule": schedule, "warmup": warmup, "grad_accum": grad_accum, "max_grad_norm": max_grad_norm,
        "precision": precision, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "drop_invalid": drop_invalid,
    }
    accelerator = make_accelerator(device, precision, report_to=report_to, run_dir=run_dir)
    runtime = _Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes,
                       accelerator.autocast)
    run = Path(run_dir) if run_dir is not None else None
    resume_from = latest_checkpoint(run / CHECKPOINTS_DIR) if resume and run is not None else None
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    data_digest = _data_digest(df) if save_every or resume else None
    if saved is not None:
        changed = changed_options(saved["config"], settings, RESUME_FREE)
        if changed:
            raise PrefnoiseError(f"--resume: {resume_from} was written with different {', '.join(changed)}; "
                                 "use the same options or drop --resume to start over")
        if saved.get("data") != data_digest:
            raise PrefnoiseError("--resume: the data differs from the checkpoint's (other pairs, text or labels); "
                                 "use the same data or start over with --overwrite")
    torch.manual_seed(seed)
    if model is None:
        model = build_reward_model(
            df,
            backend=backend,
            model_path=model_path,
            encoder_path=encoder_path,
            max_length=max_length,
            hidden=hidden,
            layers=layers,
            dropout=dropout,
            output_clip=output_clip,
            cache_dir=cache_dir,
            embed_features=embed_features,
            head=head,
        )
    if lora_r:
        from prefnoise.reward.models import add_lora

        add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    model.module.to(runtime.device)
    val_mask = split_by_pair_id(df[C.PAIR_ID], val_fraction, seed)
    train_index = np.flatnonzero(~val_mask)
    val_index = np.flatnonzero(val_mask)
    if len(train_index) == 0:
        raise PrefnoiseError(f"no training pairs: {df.height} rows, --val-fraction {val_fraction}")
    if early_stopping is not None and len(val_index) == 0:
        raise PrefnoiseError("--early-stopping needs validation pairs; raise --val-fraction")
    sides = _prepare_sides(model, df, runtime.device, on_embed, on_embed_start)
    lengths = _side_lengths(model, sides)  # text backends train on length-grouped batches
    clean = ~torch.as_tensor(df[C.FLIPPED].fill_null(False).to_numpy()) if C.FLIPPED in df.columns else None

    def loss_of(margin: Tensor) -> Tensor:
        return entry.fn(margin_scale * margin, **_only(loss_params, entry.params, loss))

    per_rank = len(train_index) // runtime.world  # equal step counts keep data-parallel ranks in lockstep
    if per_rank == 0:
        raise PrefnoiseError(f"{len(train_index)} training pairs cannot be shared by {runtime.world} processes")
    steps_per_epoch = math.ceil(math.ceil(per_rank / batch_size) / grad_accum)
    total_steps = epochs * steps_per_epoch

    def where(step: int) -> tuple[int, int]:  # (epoch, step within it), 1-based, of global step ``step``
        return (step - 1) // steps_per_epoch + 1, (step - 1) % steps_per_epoch + 1

    def fail(what: str, value: float | None, step: int, after: bool = False) -> PrefnoiseError:
        return _diverged(what, value, *where(step), after=after)

    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and lora_r:
        raise PrefnoiseError("--lora-r under FSDP is not supported for fit-reward; use data-parallel (DDP) or no LoRA")
    # FSDP shards the module in place: an unsharded copy receives the gathered weights at the end
    unsharded = copy.deepcopy(model.module) if sharded else None
    trainer = Trainer(accelerator, model.module, lr=lr, weight_decay=weight_decay, schedule=schedule,
                      warmup_steps=round(warmup * total_steps), total_steps=total_steps,
                      max_grad_norm=max_grad_norm, fail=fail)
    net = trainer.model

    # Where a resumed run stands: optimizer step, the epoch's running loss, history, early stopping.
    start_step, history = 0, []
    best_loss, best_epoch, best_state, patience = math.inf, 0, None, 0
    epoch_total, epoch_count = 0.0, 0
    kept: list[dict[str, Any]] = []
    if run is not None and accelerator.is_main_process:
        _start_run_dir(run, resumed=resume_from is not None)
    accelerator.wait_for_everyone()
    if resume_from is not None and saved is not None:
        accelerator.load_state(str(resume_from))
        start_step, history = saved["step"], saved["history"]
        best_loss, best_epoch, patience = saved["best_loss"], saved["best_epoch"], saved["patience"]
        epoch_total, epoch_count = saved["epoch_total"], saved["epoch_count"]
        if (resume_from / BEST_STATE).is_file():
            best_state = torch.load(resume_from / BEST_STATE, map_location="cpu", weights_only=True)
        if accelerator.is_main_process:
            kept = truncate_metrics(run / RECORDS_FILE, start_step)
    log = MetricsLog(accelerator, run / RECORDS_FILE if run is not None else None, report_to=report_to)
    log.records = kept
    start_trackers(accelerator, report_to, "fit-reward", settings)
    if on_start is not None:
        on_start(epochs * per_rank)
        if start_step and on_progress is not None:
            on_progress(min(start_step * batch_size * grad_accum, epochs * per_rank))

    def compute(rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        with runtime.autocast():
            rewards = net(**model.batch(sides, rows, runtime.device)).float()
        chosen, rejected = rewards.reshape(2, len(rows))
        losses = loss_of(chosen - rejected)
        return losses.mean(), losses, (chosen - rejected).detach()

    def checkpoint(step: int, epoch_sums: tuple[float, int]) -> None:
        trainer.watch.check(net)  # never a checkpoint of diverged weights
        state = {"config": settings, "data": data_digest, "history": history, "best_loss": best_loss,
                 "best_epoch": best_epoch, "patience": patience, "epoch_total": epoch_sums[0],
                 "epoch_count": epoch_sums[1]}

        def write_best(directory: Path) -> None:
            if best_state is not None:
                torch.save(best_state, directory / BEST_STATE)

        save_checkpoint(accelerator, run / CHECKPOINTS_DIR, step, state, write_best)

    generator = torch.Generator().manual_seed(seed)
    step = 0
    stopped = False
    for epoch in range(1, epochs + 1):
        order = train_index[torch.randperm(len(train_index), generator=generator).numpy()]
        step = (epoch - 1) * steps_per_epoch
        if len(history) >= epoch:  # done and validated before the checkpoint: only replay the shuffle
            step = epoch * steps_per_epoch
            continue
        net.train()
        mine = _rows_of_rank(order, per_rank, batch_size, runtime) if lengths is None else \
            order[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
        batches = list(_train_batches(mine, batch_size, lengths, seed, epoch))
        if math.ceil(len(batches) / grad_accum) != steps_per_epoch:
            raise RuntimeError(f"epoch {epoch} has {len(batches)} batches, not {steps_per_epoch} steps' worth")
        if step < start_step:  # resumed inside this epoch: its running loss comes from the checkpoint
            total, count = epoch_total, epoch_count
        else:
            total, count = 0.0, 0
        for first in range(0, len(batches), grad_accum):
            group = batches[first : first + grad_accum]
            if step < start_step:
                step += 1
                continue
            pairs = sum(len(rows) for rows in group)
            losses, margins = trainer.step(step, group, compute, [pairs / len(rows) for rows in group])
            step += 1
            step_loss = torch.cat(losses).float()
            total += float(step_loss.sum())  # the one sync per step, as before the shared trainer
            count += pairs
            if on_progress is not None:
                on_progress(pairs)
            if step % log_every == 0 or step == epoch * steps_per_epoch:
                trainer.watch.check()  # a non-finite loss or gradient is never logged
                margin = torch.cat(margins).float()
                log({"split": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                     "lr": trainer.learning_rate(step - 1),
                     "loss": _mean_over_ranks(float(step_loss.sum()), len(step_loss), runtime),
                     "reward_accuracy": pairwise_accuracy(margin, torch.ones(len(margin), dtype=torch.bool)),
                     "margin": float(margin.mean()),
                     **({"grad_norm": float(trainer.last_grad_norm)} if trainer.last_grad_norm is not None else {})})
            if save_every and step % save_every == 0 and step not in (total_steps, epoch * steps_per_epoch):
                checkpoint(step, (total, count))  # inside the epoch (at its end: after validation, below)
        trainer.watch.check(net)  # the epoch's last updates, or a non-finite gradient, before validation
        row: dict[str, Any] = {"epoch": epoch, "train_loss": _mean_over_ranks(total, count, runtime)}
        if len(val_index):
            chosen, rejected = _pair_rewards(model, sides, val_index, runtime, EVAL_BATCH[backend])
            reshard(model.module)
            margin = chosen - rejected
            _check_margins(margin, "the validation margins", epoch, steps_per_epoch)
            row["val_loss"] = float(loss_of(margin).mean())
            row["val_accuracy"] = pairwise_accuracy(margin, torch.ones(len(margin), dtype=torch.bool))
            if clean is not None:
                row["val_clean_accuracy"] = pairwise_accuracy(margin, clean[val_index])
            log({"split": "val", "step": step, "epoch": epoch, "loss": row["val_loss"],
                 "reward_accuracy": row["val_accuracy"],
                 **({"clean_reward_accuracy": row["val_clean_accuracy"]} if clean is not None else {})})
        else:  # no validation pass: a batch of training rows shows whether the weights still give finite rewards
            probe = train_index[: min(EVAL_BATCH[backend], batch_size)]  # one training batch's worth
            chosen, rejected = _pair_rewards(model, sides, probe, runtime, EVAL_BATCH[backend])
            reshard(model.module)
            _check_margins(chosen - rejected, "the margins", epoch, steps_per_epoch)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if early_stopping is not None:
            if row["val_loss"] < best_loss:
                best_loss, best_epoch, patience = row["val_loss"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
            else:
                patience += 1
                stopped = patience >= early_stopping
        if stopped:
            break
        if save_every and step % save_every == 0 and step != total_steps:
            checkpoint(step, (total, count))
    accelerator.wait_for_everyone()
    if best_state is not None:
        model.module.load_state_dict(best_state)
    if unsharded is not None:  # every process gathers; the main one (which saves) gets the weights
        full = accelerator.get_state_dict(net)
        if accelerator.is_main_process:
            unsharded.load_state_dict(full)
        model.module = unsharded.to(runtime.device)
    accelerator.end_training()  # closes the trackers (and, launched, the process group): after the gather
    if lora_r:
        from prefnoise.reward.models import merge_lora

        merge_lora(model)
    model.module.eval()
    final = dict(history[best_epoch - 1] if best_state is not None else history[-1])
    model.config = {**model.config, "loss": loss, "loss_params": loss_params, "margin_scale": margin_scale}
    metrics = {
        "backend": backend,
        "loss": loss,
        "loss_params": loss_params,
        "margin_scale": margin_scale,
        "epochs": history,
        "final": final,
        "stopped_epoch": history[-1]["epoch"],
        "best_epoch": best_epoch or history[-1]["epoch"],
        "train_pairs": int(len(train_index)),
        "val_pairs": int(len(val_index)),
        "dropped": {DROP_REASON: dropped} if dropped else {},
        "truncated_sequences": sum(s["truncated"] for s in getattr(model, "truncation", [])),
        "device": str(runtime.device),
        "processes": runtime.world,
        "optimizer_steps": step,
        "resumed_from_step": start_step if resume_from is not None else None,
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "val_fraction": val_fraction,
            "seed": seed,
            "early_stopping": early_stopping,
            "max_length": max_length if backend != "mlp" else None,
            "schedule": schedule,
            "warmup": warmup,
            "grad_accum": grad_accum,
            "max_grad_norm": max_grad_norm,
            "precision": precision,
            "lora_r": lora_r,
        },
    }
    splits = pair_splits(df[C.PAIR_ID], train_index, val_index)
    return FitResult(model=model, metrics=metrics, is_main=accelerator.is_main_process, pair_splits=splits,
                     records=log.records)


def _rows_of_rank(order: np.ndarray, per_rank: int, batch_size: int, runtime: _Runtime) -> np.ndarray:
    """This process's training rows of the epoch's ``order``: process r of P takes rows [r·k, (r+1)·k) of
    each global batch of P·``batch_size`` rows (k = its size / P), so P processes at batch B take the
    same steps as one process at batch P·B."""
    usable = order[: per_rank * runtime.world]
    width = runtime.world * batch_size
    parts = []
    for start in range(0, len(usable), width):
        block = usable[start : start + width]
        share = len(block) // runtime.world
        parts.append(block[runtime.rank * share : (runtime.rank + 1) * share])
    return np.concatenate(parts) if parts else usable[:0]


def _only(params: dict[str, float], accepted: tuple[str, ...], loss: str) -> dict[str, float]:
    """The loss parameters ``loss`` takes; a parameter it does not take is an error."""
    extra = sorted(set(params) - set(accepted))
    if extra:
        flags = ", ".join(f"--{k}" for k in extra)
        takes = ", ".join(f"--{k}" for k in accepted) or "no parameters"
        raise PrefnoiseError(f"--loss {loss} does not use {flags}; it takes {takes}")
    return params


def _check_options(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    margin_scale: float,
    weight_decay: float,
    early_stopping: int | None,
    val_fraction: float,
    max_length: int = 1,
    hidden: int = 1,
    layers: int = 0,
    dropout: float = 0.0,
    output_clip: float | None = None,
) -> None:
    """PrefnoiseError on the first invalid option; every float must be finite (NaN passes no `>` test)."""
    counts = [
        ("--epochs", epochs, 1),
        ("--batch-size", batch_size, 1),
        ("--early-stopping", early_stopping, 1),
        ("--max-length", max_length, 1),
        ("--hidden", hidden, 1),
        ("--layers", layers, 0),
    ]
    for flag, value, least in counts:
        if value is None and flag == "--early-stopping":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise PrefnoiseError(f"{flag} must be an integer >= {least}, got {value}")
        if value < least:
            raise PrefnoiseError(f"{flag} must be >= {least}, got {value}")
    check_finite_number("--lr", lr, low=0, low_open=True)
    check_finite_number("--margin-scale", margin_scale, low=0, low_open=True)
    check_finite_number("--weight-decay", weight_decay, low=0)
    check_finite_number("--val-fraction", val_fraction, low=0, high=1)
    check_finite_number("--dropout", dropout, low=0, high=1)
    check_finite_number("--output-clip", output_clip, low=0, low_open=True, allow_none=True)


def _diverged(what: str, value: float | None, epoch: int, step: int, *, after: bool = False) -> PrefnoiseError:
    """The error that stops a diverging run (``value``: the non-finite number, None or finite when unknown)."""
    shown = f" ({nonfinite_name(value)})" if value is not None and not math.isfinite(value) else ""
    where = f"after epoch {epoch}, step {step}" if after else f"at epoch {epoch}, step {step}"
    return PrefnoiseError(
        f"training diverged: {what} became non-finite{shown} {where}; lower --lr or check the data; nothing was saved"
    )


def _check_margins(margin: Tensor, what: str, epoch: int, step: int) -> None:
    """PrefnoiseError when a margin computed after epoch ``epoch`` is NaN or ±inf (overflowing weights)."""
    finite = torch.isfinite(margin)
    if not bool(finite.all()):
        raise _diverged(what, float(margin[~finite][0]), epoch, step, after=True)


def check_finite_rewards(rewards: Sequence[Tensor], rows: np.ndarray, model_name: str | None = None) -> None:
    """PrefnoiseError when any reward is NaN or ±inf: a model that produces them is damaged or diverged.

    ``rewards``: per side, one reward per row; ``rows``: the 1-based row number of each row.
    """
    bad = torch.stack([~torch.isfinite(r) for r in rewards]) if rewards else torch.zeros(0, 0, dtype=torch.bool)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    first = int(bad.any(dim=0).nonzero()[0, 0])
    prefix = f"{model_name}: " if model_name else ""
    raise PrefnoiseError(
        f"{prefix}the model produced non-finite rewards for {n_bad} responses (first at row {int(rows[first])}); "
        "the model is damaged or diverged; train it again with `prefnoise fit-reward`"
    )


def _checked_features(
    model: RewardModel, df: pl.DataFrame, columns: Sequence[str], source: str, drop_invalid: bool
) -> tuple[pl.DataFrame, np.ndarray]:
    """``df`` with finite feature vectors (when ``model`` reads them), and each kept row's 1-based number."""
    if model.backend != "mlp":
        return df, np.arange(1, df.height + 1)
    numbered = df.with_row_index("__row", offset=1)
    numbered, _ = check_finite_features(numbered, source, drop_invalid, columns=columns)
    return numbered.drop("__row"), numbered["__row"].to_numpy()


def _mean_over_ranks(total: float, count: int, runtime: _Runtime) -> float:
    if runtime.world > 1:
        import torch.distributed as dist

        buffer = torch.tensor([total, float(count)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(buffer)
        total, count = float(buffer[0]), int(buffer[1])
    return total / max(count, 1)


def _data_digest(df: pl.DataFrame) -> str:
    """Hex digest of what a run trains on, in order: every column's values (pair_ids, texts, features,
    labels), so that a resumed run refuses other data."""
    digest = hashlib.blake2b(digest_size=16)
    for column in sorted(df.columns):
        digest.update(column.encode() + b"\0")
        digest.update(pickle.dumps(df[column].to_list(), protocol=4))
    return digest.hexdigest()


def _start_run_dir(run: Path, *, resumed: bool) -> None:
    """Create the output directory a run writes into as it trains (marked as fit-reward's); when not
    resuming, clear what an earlier run left there (its checkpoints and metrics)."""
    from prefnoise.outputs import check_output_dir, write_marker

    check_output_dir(run, command=FIT_REWARD, overwrite=True, resume=True)  # never a foreign directory
    run.mkdir(parents=True, exist_ok=True)
    write_marker(run, FIT_REWARD)  # lists what is there now (ownership was just checked)
    if not resumed:
        shutil.rmtree(run / CHECKPOINTS_DIR, ignore_errors=True)
        (run / RECORDS_FILE).unlink(missing_ok=True)


def save_reward_model(result: FitResult, directory: str | Path, *, history: list[dict[str, Any]]) -> Path:
    """Write model, config, metrics.json, metrics.jsonl, history.json and the trained/validated pair_ids
    (training_pairs.parquet) into ``directory`` atomically; return it.

    An earlier fit-reward output there is replaced, except its tracker logs (``runs/``), which move over.
    """
    from prefnoise.outputs import output_dir_state

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


def score_table(
    model: RewardModel,
    df: pl.DataFrame,
    batch_size: int | None = None,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    drop_invalid: bool = False,
    source: str = "data",
    model_name: str | None = None,
    on_embed: Progress | None = None,
) -> pl.DataFrame:
    """``df`` with float32 ``chosen_reward`` and ``rejected_reward`` from ``model``.

    ``on_progress(n)`` advances by rows scored; ``on_embed(n)`` by texts embed+mlp's encoder ran on.

    Feature vectors (mlp) must be finite: a bad row raises PrefnoiseError naming ``source``, or with
    ``drop_invalid`` is left out of the result. Non-finite rewards (a damaged model, e.g. NaN
    weights) raise PrefnoiseError naming ``model_name``.
    """
    df, rows = _checked_features(model, df, (C.chosen(C.FEATURES), C.rejected(C.FEATURES)), source, drop_invalid)
    runtime = _runtime(device)
    model.module.to(runtime.device)
    sides = _prepare_sides(model, df, runtime.device, on_embed)
    chosen, rejected = _pair_rewards(
        model, sides, np.arange(df.height), runtime, batch_size or EVAL_BATCH[model.backend], on_progress
    )
    check_finite_rewards([chosen, rejected], rows, model_name)
    return df.with_columns(
        pl.Series(C.chosen(C.REWARD), chosen.numpy(), dtype=pl.Float32),
        pl.Series(C.rejected(C.REWARD), rejected.numpy(), dtype=pl.Float32),
    )


RESPONSE = "response"


def score_responses(
    model: RewardModel,
    df: pl.DataFrame,
    batch_size: int | None = None,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    drop_invalid: bool = False,
    source: str = "data",
    model_name: str | None = None,
    on_embed: Progress | None = None,
) -> pl.DataFrame:
    """``df`` (one row per prompt, response) with a float32 ``reward`` column from ``model``.

    Finite features and finite rewards are checked as in :func:`score_table`.
    """
    missing = [c for c in (C.PROMPT, RESPONSE) if c not in df.columns]
    if model.backend == "mlp":
        missing = [c for c in (C.FEATURES,) if c not in df.columns]
    if missing:
        raise PrefnoiseError(f"--responses needs column(s) {', '.join(missing)}; columns are {', '.join(df.columns)}")
    df, numbers = _checked_features(model, df, (C.FEATURES,), source, drop_invalid)
    runtime = _runtime(device)
    model.module.to(runtime.device)
    n = df.height
    prompts = df[C.PROMPT].to_list() if C.PROMPT in df.columns else [""] * n
    responses = df[RESPONSE].to_list() if RESPONSE in df.columns else [""] * n
    side = model.prepare(
        prompts, responses, _features(df, C.FEATURES), device=runtime.device, on_progress=on_embed,
        **_prompt_messages(model, df)
    )
    rewards, _ = _pair_rewards(
        model, [side], np.arange(n), runtime, batch_size or EVAL_BATCH[model.backend], on_progress
    )
    check_finite_rewards([rewards], numbers, model_name)
    return df.with_columns(pl.Series(C.REWARD, rewards.numpy(), dtype=pl.Float32))
