"""Optimizer steps over micro-batches, the same for every model prefnoise trains: AdamW, the learning
rate of :func:`learning_rate`, gradient accumulation and clipping, and a :class:`DivergenceWatch`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prefnoise.errors import PrefnoiseError
from prefnoise.options.training import SCHEDULES
from prefnoise.training.finite import first_nonfinite_parameter
from prefnoise.training.memory import keep_freed_memory


def learning_rate(step: int, total_steps: int, lr: float, schedule: str, warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from lr/(w+1) to lr over the first w = ``warmup_steps`` steps, then constant,
    linear decay towards 0 at ``total_steps`` (as transformers' linear schedule, except that step 0
    is not 0: every step moves the weights), or cosine decay.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr

def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases or norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


Fail = Callable[..., PrefnoiseError]  # fail(what, value, step, after=False) -> the error that stops the run


class DivergenceWatch:
    """Stops a run whose loss, gradient norm or weights become NaN or inf, without a sync per step.

    ``note`` keeps each optimizer step's mean loss and gradient norm on the device; ``check``
    (called before anything is logged, evaluated or saved) reads them all at once, gathered over
    processes so that every process raises the same error (``fail(what, value, step, after)``) at
    the first bad step.
    """

    def __init__(self, accelerator, fail: Fail) -> None:
        self.accelerator, self.fail = accelerator, fail
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.last_step = 0

    def note(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        """Remember optimizer step ``step`` (0-based): its micro-batch losses and gradient norm."""
        loss = torch.cat([x.reshape(-1) for x in losses]).float().mean()
        norm = loss.new_zeros(()) if grad_norm is None else torch.as_tensor(grad_norm).float().to(loss.device)
        self.steps.append(step + 1)
        self.last_step = step + 1
        self.values.append(torch.stack([loss, norm]))

    def check(self, model=None) -> None:
        """Raise at the first noted step with a non-finite loss or gradient norm, or (with ``model``)
        when a weight is non-finite; forget the noted steps."""
        steps, values = self.steps, self.values
        self.steps, self.values = [], []
        if values:
            stacked = torch.stack(values)  # (steps, 2)
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.gather(stacked)  # process after process
            stacked = stacked.reshape(-1, len(steps), 2).cpu()  # (processes, steps, 2)
            bad = ~torch.isfinite(stacked)
            if bool(bad.any()):
                i = int(bad.any(dim=2).any(dim=0).nonzero()[0, 0])
                column = 0 if bool(bad[:, i, 0].any()) else 1
                value = float(stacked[bad[:, i, column], i, column][0])
                what = "the loss" if column == 0 else "the gradient norm"
                raise self.fail(what, value, steps[i])
        if model is not None:
            broken = first_nonfinite_parameter(self.accelerator.unwrap_model(model))
            if self.accelerator.num_processes > 1:  # FSDP: each process holds (and checked) its own shard
                from accelerate.utils import gather_object  # heavy: accelerate, launched runs only

                broken = next((name for name in gather_object([broken]) if name is not None), None)
            if broken is not None:
                raise self.fail(f"weight {broken!r}", None, self.last_step, after=True)


Compute = Callable[[Any], tuple[torch.Tensor, torch.Tensor, Any]]


class Trainer:
    """Optimizer steps over micro-batches, the same for every model prefnoise trains.

    ``compute(micro_batch)`` returns (objective, per-row losses, anything else); the objective of a
    micro-batch is divided by its divisor before backward, gradients are accumulated over the step's
    micro-batches (synchronised across processes on the last one only), clipped to
    ``max_grad_norm`` (0: not clipped), and the optimizer steps at :func:`learning_rate`.
    """

    def __init__(self, accelerator, model: torch.nn.Module, *, lr: float, weight_decay: float, schedule: str,
                 warmup_steps: int, total_steps: int, max_grad_norm: float, fail: Fail) -> None:
        if schedule not in SCHEDULES:
            raise PrefnoiseError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        self.accelerator = accelerator
        self.lr, self.schedule, self.warmup_steps, self.total_steps = lr, schedule, warmup_steps, total_steps
        self.max_grad_norm = max_grad_norm
        keep_freed_memory()  # each step's tensors reuse the last step's pages
        optimizer = adamw(model, lr, weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.watch = DivergenceWatch(accelerator, fail)
        self.last_grad_norm: torch.Tensor | None = None

    def learning_rate(self, step: int) -> float:
        """This run's learning rate at optimizer step ``step`` (0-based)."""
        return learning_rate(step, self.total_steps, self.lr, self.schedule, self.warmup_steps)

    def step(self, step: int, micro_batches: Sequence[Any], compute: Compute,
             divisors: Sequence[float] | None = None) -> tuple[list[torch.Tensor], list[Any]]:
        """Take optimizer step ``step`` (0-based) over ``micro_batches``; return per micro-batch its
        detached per-row losses and what ``compute`` returned besides."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        divisors = divisors if divisors is not None else [len(micro_batches)] * len(micro_batches)
        losses, extras = [], []
        last = len(micro_batches) - 1
        for i, (batch, divisor) in enumerate(zip(micro_batches, divisors, strict=True)):
            with contextlib.nullcontext() if i == last else self.accelerator.no_sync(self.model):
                objective, rows, extra = compute(batch)
                self.accelerator.backward(objective / divisor if divisor != 1 else objective)
            losses.append(rows.detach())
            extras.append(extra)
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
                grad_norm = grad_norm.full_tensor()
        self.last_grad_norm = grad_norm
        self.watch.note(step, losses, grad_norm)  # on the device: no sync here
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses, extras


def reshard(model: torch.nn.Module) -> None:
    """Under FSDP2, free the gathered weights an evaluation forward (no backward) leaves behind, so that
    a later ``state_dict`` or checkpoint sees sharded parameters; nothing otherwise."""
    from torch.distributed.fsdp import FSDPModule  # heavy: torch.distributed, FSDP runs only

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
