"""The step loop every prefnoise training run takes: :func:`fit` runs a :class:`Task` in a
:class:`~prefnoise.training.run.Run`.

The loop owns the order of things after each optimizer step: the divergence check before anything is
logged, evaluated or saved; the train record every ``log_every`` steps; the task's evaluations; the end
of an epoch (its validation and early stopping); a checkpoint every ``save_every`` steps (never of the
last step, whose model is saved anyway). What a step trains on and what its numbers are is the task's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from prefnoise.training.run import Run
from prefnoise.training.trainer import Trainer


@dataclass(frozen=True)
class Step:
    """One optimizer step: its 0-based index, this process's micro-batches and each one's divisor."""

    index: int
    micro_batches: Sequence[Any]
    divisors: Sequence[float]


@dataclass(frozen=True)
class Cadence:
    """How often a run logs a train record, evaluates (0: the task decides) and checkpoints (0: never)."""

    log_every: int
    eval_every: int = 0
    save_every: int = 0


class Task(Protocol):
    """What :func:`fit` needs of the model being trained (a reward model, a policy)."""

    trainer: Trainer
    total_steps: int

    def steps(self, start: int) -> Iterator[Step]:
        """The optimizer steps from ``start`` (0-based) to the last."""

    def compute(self, micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(objective, per-row losses, anything else) of one micro-batch."""

    def after_step(self, step: Step, losses: list[torch.Tensor], extras: list[Any]) -> None:
        """Bookkeeping after a step (running loss, progress)."""

    def train_record(self, done: int, losses: list[torch.Tensor], extras: list[Any]) -> dict[str, Any]:
        """The train record of step ``done`` (1-based)."""

    def evaluate(self, done: int) -> None:
        """A held-out evaluation at step ``done`` (logged)."""

    def epoch_end(self, done: int) -> bool:
        """Whether step ``done`` ends an epoch the task validates after."""

    def end_epoch(self, done: int) -> bool:
        """Validate after the epoch ending at step ``done``; True to stop early."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the options (loop counters, fingerprints)."""

    def write_extra(self, directory: Path) -> None:
        """Anything else a checkpoint needs, written into its ``directory`` (main process)."""


def fit(task: Task, run: Run, cadence: Cadence, start: int = 0) -> int:
    """Train ``task`` from optimizer step ``start`` to its last (or an early stop); return the steps done."""
    watch, model, done = task.trainer.watch, task.trainer.model, start
    for step in task.steps(start):
        losses, extras = task.trainer.step(step.index, step.micro_batches, task.compute, step.divisors)
        done = step.index + 1
        task.after_step(step, losses, extras)
        ends_epoch = task.epoch_end(done)
        logs = done % cadence.log_every == 0 or done == task.total_steps or ends_epoch
        evaluates = bool(cadence.eval_every) and done % cadence.eval_every == 0 and done != task.total_steps
        saves = bool(cadence.save_every) and done % cadence.save_every == 0 and done != task.total_steps
        if logs or evaluates or saves:
            watch.check(model if saves else None)  # a non-finite loss or weight is never logged or saved
        if logs:
            run.log(task.train_record(done, losses, extras))
        if evaluates:
            task.evaluate(done)
        if ends_epoch:
            watch.check(model)  # the epoch's last updates, before validation
            if task.end_epoch(done):
                break
        if saves:
            watch.check(model)  # never a checkpoint of diverged weights
            run.save(done, task.state(), task.write_extra)
    return done
