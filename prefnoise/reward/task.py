"""Training a reward model: the reward task of the one training run (:class:`prefnoise.training.run.Run`).

The loss sees the margin z = β·(r(chosen) − r(rejected)); the label is always "chosen is better", so
a flipped pair is simply a pair whose z should be negative. Under ``accelerate launch`` (several
processes) it runs data-parallel (DDP) or FSDP: every process takes its share of each epoch's batches,
validation runs everywhere on the whole split, and only the main process writes.

A run stops with PrefnoiseError as soon as its loss, weights or validation margins turn non-finite.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from prefnoise import columns as C
from prefnoise.batching import group_order
from prefnoise.errors import PrefnoiseError
from prefnoise.losses import get_margin_loss
from prefnoise.options.fit_reward import FitRewardConfig
from prefnoise.reward.embed import new_embed_mlp
from prefnoise.reward.models import RewardModel, new_mlp
from prefnoise.reward.scoring import (
    EVAL_BATCH,
    Runtime,
    feature_array,
    pair_rewards,
    pairwise_accuracy,
    prepare_sides,
    side_lengths,
)
from prefnoise.reward.transformer import add_lora, check_training_fits, merge_lora, new_transformer
from prefnoise.training import Trainer, nonfinite_name, reshard, resolve_device, split_by_pair_id
from prefnoise.training.loop import Step
from prefnoise.training.run import Run

BEST_STATE = "best_state.pt"  # a checkpoint's early-stopping snapshot (torch.save of a state dict)
Progress = Callable[[int], None]


@dataclass
class Callbacks:
    """How a caller follows training: ``on_start(total)`` announces the training pairs to come,
    ``on_progress(n)`` advances by pairs trained, ``on_epoch(row)`` receives each epoch's metrics row;
    ``on_embed_start(total)`` / ``on_embed(n)`` do the same for the texts embed+mlp's encoder runs on."""

    on_start: Callable[[int], None] | None = None
    on_progress: Progress | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_embed_start: Callable[[int], None] | None = None
    on_embed: Progress | None = None


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
        features = feature_array(df, C.chosen(C.FEATURES))
        if features is None:
            raise PrefnoiseError(
                "--model mlp needs chosen_features/rejected_features columns; for text use "
                "--model PATH (a local HF model) or --model embed+mlp --encoder PATH"
            )
        return new_mlp(features.shape[1], hidden=hidden, layers=layers, dropout=dropout, output_clip=output_clip)
    if backend == "embed+mlp":
        if encoder_path is None:
            raise PrefnoiseError("--model embed+mlp needs --encoder PATH (a local HF encoder directory)")
        return new_embed_mlp(encoder_path, max_length=max_length, hidden=hidden, layers=layers, dropout=dropout,
                             output_clip=output_clip, cache_dir=cache_dir, embed_features=embed_features)
    if backend == "transformer":
        if model_path is None:
            raise PrefnoiseError("the transformer backend needs --model PATH (a local HF model directory)")
        return new_transformer(model_path, max_length=max_length, output_clip=output_clip, head=head)
    raise PrefnoiseError(f"unknown backend {backend!r}; use mlp, embed+mlp or a model directory")


def model_of(config: FitRewardConfig, df: pl.DataFrame) -> RewardModel:
    """The fresh reward model ``config`` describes, sized for ``df``."""
    return build_reward_model(
        df, backend=config.backend, model_path=config.model if config.backend == "transformer" else None,
        encoder_path=config.encoder, max_length=config.max_length, hidden=config.hidden, layers=config.layers,
        dropout=config.dropout, output_clip=config.output_clip, cache_dir=config.cache_dir,
        embed_features=config.embed_features, head=config.head)


def prepared_features(config: FitRewardConfig, df: pl.DataFrame) -> list[Tensor]:
    """The (chosen, rejected) feature tensors an MLP of ``config``'s backend (mlp, embed+mlp) reads for
    every row of ``df``: its feature vectors, or the frozen encoder's embeddings (each distinct text
    embedded once, through the embedding cache)."""
    model = model_of(config, df)
    return prepare_sides(model, df, resolve_device(config.device), None)


def train_batches(mine: np.ndarray, size: int, lengths: Sequence[int] | None, seed: int, epoch: int
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


def rows_of_rank(order: np.ndarray, per_rank: int, batch_size: int, runtime: Runtime) -> np.ndarray:
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


def diverged(what: str, value: float | None, epoch: int, step: int, *, after: bool = False) -> PrefnoiseError:
    """The error that stops a diverging run (``value``: the non-finite number, None or finite when unknown)."""
    shown = f" ({nonfinite_name(value)})" if value is not None and not math.isfinite(value) else ""
    where = f"after epoch {epoch}, step {step}" if after else f"at epoch {epoch}, step {step}"
    return PrefnoiseError(
        f"training diverged: {what} became non-finite{shown} {where}; lower --lr or check the data; nothing was saved"
    )


def check_margins(margin: Tensor, what: str, epoch: int, step: int) -> None:
    """PrefnoiseError when a margin computed after epoch ``epoch`` is NaN or ±inf (overflowing weights)."""
    finite = torch.isfinite(margin)
    if not bool(finite.all()):
        raise diverged(what, float(margin[~finite][0]), epoch, step, after=True)


def mean_over_ranks(total: float, count: int, runtime: Runtime) -> float:
    """``total / count`` summed over every process."""
    if runtime.world > 1:
        import torch.distributed as dist  # only launched runs have a process group

        buffer = torch.tensor([total, float(count)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(buffer)
        total, count = float(buffer[0]), int(buffer[1])
    return total / max(count, 1)


def data_digest(df: pl.DataFrame) -> str:
    """Hex digest of what a run trains on, in order: every column's values (pair_ids, texts, features,
    labels), so that a resumed run refuses other data."""
    digest = hashlib.blake2b(digest_size=16)
    for column in sorted(df.columns):
        digest.update(column.encode() + b"\0")
        digest.update(pickle.dumps(df[column].to_list(), protocol=4))
    return digest.hexdigest()


@dataclass
class EpochState:
    """Where a run stands, as a checkpoint keeps it: the history rows, early stopping, the running loss."""

    history: list[dict[str, Any]]
    best_loss: float = math.inf
    best_epoch: int = 0
    patience: int = 0
    epoch_total: float = 0.0
    epoch_count: int = 0
    best_state: dict[str, Tensor] | None = None

    def to_checkpoint(self, total: float, count: int) -> dict[str, Any]:
        """The trainer.json entries (the running loss of the epoch in progress: ``total``/``count``)."""
        return {"history": self.history, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "patience": self.patience, "epoch_total": total, "epoch_count": count}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any] | None, directory: Path | None) -> EpochState:
        """The state a checkpoint's trainer.json (and best_state.pt) hold; a fresh one without."""
        if saved is None or directory is None:
            return cls(history=[])
        state = cls(saved["history"], saved["best_loss"], saved["best_epoch"], saved["patience"],
                    saved["epoch_total"], saved["epoch_count"])
        if (directory / BEST_STATE).is_file():
            state.best_state = torch.load(directory / BEST_STATE, map_location="cpu", weights_only=True)
        return state


class RewardTask:
    """The reward model, its prepared pairs and split, and the loss: the training of ``fit-reward``."""

    def __init__(self, config: FitRewardConfig, df: pl.DataFrame, run: Run, network: RewardModel | None,
                 callbacks: Callbacks) -> None:
        self.config, self.df, self.run, self.callbacks = config, df, run, callbacks
        accelerator = run.accelerator
        self.runtime = Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes,
                               accelerator.autocast)
        torch.manual_seed(config.seed)
        self.model = network if network is not None else model_of(config, df)
        if config.lora_r:
            add_lora(self.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
        self.model.module.to(self.runtime.device)
        val_mask = split_by_pair_id(df[C.PAIR_ID], config.val_fraction, config.seed)
        self.train_index, self.val_index = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
        if len(self.train_index) == 0:
            raise PrefnoiseError(f"no training pairs: {df.height} rows, --val-fraction {config.val_fraction}")
        if config.early_stopping is not None and len(self.val_index) == 0:
            raise PrefnoiseError("--early-stopping needs validation pairs; raise --val-fraction")
        self.sides = prepare_sides(self.model, df, self.runtime.device, callbacks.on_embed,
                                   callbacks.on_embed_start)
        self.lengths = side_lengths(self.model, self.sides)  # text backends train on length-grouped batches
        if self.model.backend == "transformer":  # before the optimizer and the first batch allocate
            check_training_fits(self.model, [self.lengths[i] for i in self.train_index], config.batch_size,
                                precision=config.precision, device=self.runtime.device,
                                early_stopping=config.early_stopping is not None)
        self.clean = ~torch.as_tensor(df[C.FLIPPED].fill_null(False).to_numpy()) if C.FLIPPED in df.columns \
            else None
        self.entry = get_margin_loss(config.loss)
        self.per_rank = len(self.train_index) // self.runtime.world  # equal step counts keep ranks in lockstep
        if self.per_rank == 0:
            raise PrefnoiseError(f"{len(self.train_index)} training pairs cannot be shared by "
                                 f"{self.runtime.world} processes")
        self.steps_per_epoch = math.ceil(math.ceil(self.per_rank / config.batch_size) / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.epochs, self.digest = EpochState(history=[]), None
        self.total, self.count, self.step_loss = 0.0, 0, torch.zeros(0)

    def loss_of(self, margin: Tensor) -> Tensor:
        """Per-pair losses at reward margins ``margin`` (scaled by β)."""
        return self.entry.fn(self.config.margin_scale * margin, **self.config.loss_params)

    def where(self, step: int) -> tuple[int, int]:
        """(epoch, step within it), 1-based, of global step ``step``."""
        return (step - 1) // self.steps_per_epoch + 1, (step - 1) % self.steps_per_epoch + 1

    def fail(self, what: str, value: float | None, step: int, after: bool = False) -> PrefnoiseError:
        """The error of a run that diverged at ``step``."""
        return diverged(what, value, *self.where(step), after=after)

    def make_trainer(self) -> Trainer:
        """The shared trainer over the model (prepared by accelerate: DDP or FSDP when launched)."""
        config = self.config
        if self.run.sharded() and config.lora_r:
            raise PrefnoiseError("--lora-r under FSDP is not supported for fit-reward; use data-parallel (DDP) "
                                 "or no LoRA")
        self.unsharded = self.run.unsharded_copy(self.model.module)
        trainer = Trainer(self.run.accelerator, self.model.module, lr=config.lr, weight_decay=config.weight_decay,
                          schedule=config.schedule, warmup_steps=round(config.warmup * self.total_steps),
                          total_steps=self.total_steps, max_grad_norm=config.max_grad_norm, fail=self.fail)
        self.trainer, self.net = trainer, trainer.model
        return trainer

    def compute(self, rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """(mean loss, per-pair losses, margins) of the training rows ``rows``."""
        with self.runtime.autocast():
            rewards = self.net(**self.model.batch(self.sides, rows, self.runtime.device)).float()
        chosen, rejected = rewards.reshape(2, len(rows))
        losses = self.loss_of(chosen - rejected)
        return losses.mean(), losses, (chosen - rejected).detach()

    def epoch_batches(self, order: np.ndarray, epoch: int) -> list[np.ndarray]:
        """This process's training batches of an epoch whose shuffled rows are ``order``."""
        config, runtime = self.config, self.runtime
        mine = rows_of_rank(order, self.per_rank, config.batch_size, runtime) if self.lengths is None else \
            order[runtime.rank * self.per_rank : (runtime.rank + 1) * self.per_rank]
        batches = list(train_batches(mine, config.batch_size, self.lengths, config.seed, epoch))
        if math.ceil(len(batches) / config.grad_accum) != self.steps_per_epoch:
            raise RuntimeError(f"epoch {epoch} has {len(batches)} batches, not {self.steps_per_epoch} steps' worth")
        return batches

    def steps(self, start: int) -> Iterator[Step]:
        """The optimizer steps from ``start``: each epoch's shuffle is drawn (also for epochs done before
        the checkpoint, to replay the generator), its batches cut and shared between processes."""
        config, spe = self.config, self.steps_per_epoch
        generator = torch.Generator().manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            order = self.train_index[torch.randperm(len(self.train_index), generator=generator).numpy()]
            if len(self.epochs.history) >= epoch:  # done and validated before the checkpoint
                continue
            self.net.train()
            batches = self.epoch_batches(order, epoch)
            first_step = (epoch - 1) * spe
            resumed_inside = first_step < start  # the epoch's running loss comes from the checkpoint
            self.total, self.count = (self.epochs.epoch_total, self.epochs.epoch_count) if resumed_inside \
                else (0.0, 0)
            for k, first in enumerate(range(0, len(batches), config.grad_accum)):
                if first_step + k < start:
                    continue
                group = batches[first : first + config.grad_accum]
                pairs = sum(len(rows) for rows in group)
                yield Step(first_step + k, group, [pairs / len(rows) for rows in group])

    def after_step(self, step: Step, losses: list[Tensor], extras: list[Any]) -> None:
        """Add the step's losses to the epoch's running loss; advance the progress by its pairs."""
        self.step_loss = torch.cat(losses).float()
        pairs = sum(len(rows) for rows in step.micro_batches)
        self.total += float(self.step_loss.sum())  # the one sync per step
        self.count += pairs
        if self.callbacks.on_progress is not None:
            self.callbacks.on_progress(pairs)

    def train_record(self, done: int, losses: list[Tensor], extras: list[Any]) -> dict[str, Any]:
        """The metrics record of optimizer step ``done`` (1-based)."""
        margin = torch.cat(extras).float()
        grad_norm = self.trainer.last_grad_norm
        return {"split": "train", "step": done, "epoch": round(done / self.steps_per_epoch, 4),
                "lr": self.trainer.learning_rate(done - 1),
                "loss": mean_over_ranks(float(self.step_loss.sum()), len(self.step_loss), self.runtime),
                "reward_accuracy": pairwise_accuracy(margin, torch.ones(len(margin), dtype=torch.bool)),
                "margin": float(margin.mean()), **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})}

    def evaluate(self, done: int) -> None:
        """fit-reward validates at the end of each epoch only (:meth:`end_epoch`)."""

    def epoch_end(self, done: int) -> bool:
        """Whether step ``done`` is the last of an epoch."""
        return done % self.steps_per_epoch == 0

    def end_epoch(self, done: int) -> bool:
        """The epoch's row (train loss, validation), kept in the history; True when early stopping stops."""
        epoch = done // self.steps_per_epoch
        row: dict[str, Any] = {"epoch": epoch, "train_loss": mean_over_ranks(self.total, self.count, self.runtime)}
        self.validate(epoch, done, row)
        self.epochs.history.append(row)
        if self.callbacks.on_epoch is not None:
            self.callbacks.on_epoch(row)
        return self.early_stop(row)

    def early_stop(self, row: dict[str, Any]) -> bool:
        """Keep the best weights by validation loss; True once ``early_stopping`` epochs brought no better one."""
        state = self.epochs
        if self.config.early_stopping is None:
            return False
        if row["val_loss"] < state.best_loss:
            state.best_loss, state.best_epoch, state.patience = row["val_loss"], row["epoch"], 0
            state.best_state = {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}
            return False
        state.patience += 1
        return state.patience >= self.config.early_stopping

    def validate(self, epoch: int, step: int, row: dict[str, Any]) -> None:
        """Validate after epoch ``epoch`` into ``row`` (and the log); without validation pairs, check that a
        batch of training rows still gets finite rewards."""
        model, batch = self.model, EVAL_BATCH[self.model.backend]
        if not len(self.val_index):
            probe = self.train_index[: min(batch, self.config.batch_size)]  # one training batch's worth
            chosen, rejected = pair_rewards(model, self.sides, probe, self.runtime, batch)
            reshard(model.module)
            check_margins(chosen - rejected, "the margins", epoch, self.steps_per_epoch)
            return
        chosen, rejected = pair_rewards(model, self.sides, self.val_index, self.runtime, batch)
        reshard(model.module)
        margin = chosen - rejected
        check_margins(margin, "the validation margins", epoch, self.steps_per_epoch)
        row["val_loss"] = float(self.loss_of(margin).mean())
        row["val_accuracy"] = pairwise_accuracy(margin, torch.ones(len(margin), dtype=torch.bool))
        if self.clean is not None:
            row["val_clean_accuracy"] = pairwise_accuracy(margin, self.clean[self.val_index])
        self.run.log({"split": "val", "step": step, "epoch": epoch, "loss": row["val_loss"],
                      "reward_accuracy": row["val_accuracy"],
                      **({"clean_reward_accuracy": row["val_clean_accuracy"]} if self.clean is not None else {})})

    def state(self) -> dict[str, Any]:
        """A checkpoint's loop state: the data digest, the history, early stopping, the running loss."""
        return {"data": self.digest, **self.epochs.to_checkpoint(self.total, self.count)}

    def write_extra(self, directory: Path) -> None:
        """The early-stopping snapshot beside the checkpoint (main process)."""
        if self.epochs.best_state is not None:
            torch.save(self.epochs.best_state, directory / BEST_STATE)

    def finish(self) -> None:
        """The best weights back (early stopping), gathered under FSDP, LoRA merged, eval mode."""
        self.run.accelerator.wait_for_everyone()
        if self.epochs.best_state is not None:
            self.model.module.load_state_dict(self.epochs.best_state)
        gathered = self.run.gather(self.net, self.unsharded)
        if gathered is not None:
            self.model.module = gathered
        self.run.accelerator.end_training()  # closes the trackers (and the process group): after the gather
        if self.config.lora_r:
            merge_lora(self.model)
        self.model.module.eval()
