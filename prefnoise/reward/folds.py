"""Many reward MLPs trained as one: the fold models of audit's cross-fits, stacked on a fold axis.

Each member is the MLP a separate ``fit_reward_model`` would build and train on its own training rows:
initialised under ``torch.manual_seed(seed)``, shuffled each epoch by a generator seeded the same way,
cut into batches of ``batch_size`` rows, trained with the same loss and AdamW at the same learning rate.
The members' weights are disjoint slices of stacked tensors (members × in × out) and the objective is
the sum of each member's mean loss over its own batch, so each member's gradient is the one its separate
fit would see, and AdamW (element-wise) takes the same step: the stack trains F models at the cost of
one run of the loop (:func:`prefnoise.training.loop.fit`, through :class:`~prefnoise.reward.task.RewardTask`).

Exact only under the options that keep members independent (:func:`stackable`): no gradient clipping
(a global norm would couple them), one micro-batch per step, no weight decay (stacked biases are
matrices), no dropout (one random stream), no validation or early stopping, and members with the same
number of steps per epoch (:func:`fit_stacked` trains one stack per step count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefnoise.losses import get_margin_loss
from prefnoise.options.fit_reward import FitRewardConfig
from prefnoise.reward.fitting import FIT_REWARD, train_epochs
from prefnoise.reward.models import RewardModel
from prefnoise.reward.networks import FeatureMLP, clip_reward
from prefnoise.reward.scoring import Runtime
from prefnoise.reward.task import Callbacks, EpochState, RewardTask
from prefnoise.training.loop import Step
from prefnoise.training.run import Run, RunSpec

SCORE_ROWS = 4096  # rows per forward pass when the stack scores a table


class StackedMLP(nn.Module):
    """F :class:`FeatureMLP` members as one module: input (F, rows, in) → rewards (F, rows), each member
    on its own rows with its own weights (a batched matrix product per layer)."""

    def __init__(self, members: Sequence[FeatureMLP]) -> None:
        super().__init__()
        layers = [[m for m in member.net if isinstance(m, nn.Linear)] for member in members]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([lin[i].weight.detach().T for lin in layers]).contiguous())
            for i in range(len(layers[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([lin[i].bias.detach() for lin in layers]).unsqueeze(1).contiguous())
            for i in range(len(layers[0]))
        )
        self.output_clip = members[0].output_clip

    @property
    def members(self) -> int:
        """How many models the stack holds."""
        return int(self.weights[0].shape[0])

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = torch.relu_(x)  # in place: baddbmm's backward needs its inputs, not its output
        return clip_reward(x.squeeze(-1), self.output_clip)

    def member(self, k: int) -> FeatureMLP:
        """Member ``k`` as a plain :class:`FeatureMLP` (the weights copied)."""
        dims = [w.shape[1] for w in self.weights]
        mlp = FeatureMLP(dims[0], dims[1] if len(dims) > 1 else 1, len(dims) - 1, 0.0, self.output_clip)
        linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, weight, bias in zip(linears, self.weights, self.biases):
                lin.weight.copy_(weight[k].T)
                lin.bias.copy_(bias[k, 0])
        return mlp


def stackable(config: FitRewardConfig) -> str | None:
    """Why ``config``'s fold models cannot train as one stack (None when they can)."""
    if config.backend not in ("mlp", "embed+mlp"):
        return f"the {config.backend} backend is not an MLP on fixed features"
    checks = {
        "gradient clipping": config.max_grad_norm > 0, "gradient accumulation": config.grad_accum != 1,
        "weight decay": config.weight_decay != 0, "dropout": config.dropout != 0,
        "validation pairs": config.val_fraction != 0, "early stopping": config.early_stopping is not None,
        "LoRA": bool(config.lora_r), "checkpoints": bool(config.save_every or config.resume),
    }
    named = [name for name, present in checks.items() if present]
    return f"{named[0]} couples or changes the members" if named else None


class StackedTask(RewardTask):
    """The reward task over a stack: each optimizer step takes one batch per member (a (F, B) table of
    row indices, B the longest member's batch, −1 where a member's batch is shorter)."""

    def __init__(self, config: FitRewardConfig, sides: Sequence[Tensor], train_rows: Sequence[np.ndarray],
                 seeds: Sequence[int], run: Run) -> None:
        self.config, self.run, self.callbacks, self.df = config, run, Callbacks(), None
        accelerator = run.accelerator
        self.runtime = Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes,
                               accelerator.autocast)
        members = []
        for seed in seeds:  # each member initialised as its separate fit would be
            torch.manual_seed(seed)
            members.append(FeatureMLP(sides[0].shape[1], config.hidden, config.layers, 0.0, config.output_clip))
        self.model = RewardModel(StackedMLP(members), {"backend": "stacked"})
        self.model.module.to(self.runtime.device)
        self.both = torch.cat([side.to(self.runtime.device) for side in sides])  # chosen rows, then rejected
        self.sides = [self.both[: len(sides[0])], self.both[len(sides[0]) :]]
        self.train_rows, self.seeds = [np.asarray(r, dtype=np.int64) for r in train_rows], list(seeds)
        counts = {math.ceil(len(rows) / config.batch_size) for rows in self.train_rows}
        if len(counts) != 1 or min(len(rows) for rows in self.train_rows) == 0:
            raise ValueError("a stack's members need training rows and the same number of batches per epoch")
        self.steps_per_epoch = counts.pop()
        self.total_steps = config.epochs * self.steps_per_epoch
        self.per_rank = max(len(rows) for rows in self.train_rows)
        self.train_index, self.val_index = np.arange(self.per_rank), np.arange(0)
        self.entry = get_margin_loss(config.loss)
        self.epochs, self.digest, self.start_step, self.clean = EpochState(history=[]), None, 0, None
        self.total, self.count, self.step_loss = 0.0, 0, torch.zeros(0)

    def steps(self, start: int) -> Iterator[Step]:
        """Each epoch, every member's rows shuffled by its own generator; step k takes each member's k-th batch."""
        size, spe = self.config.batch_size, self.steps_per_epoch
        generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        for epoch in range(1, self.config.epochs + 1):
            orders = [rows[torch.randperm(len(rows), generator=g).numpy()]
                      for rows, g in zip(self.train_rows, generators)]
            self.net.train()
            self.total, self.count = 0.0, 0
            for k in range(spe):
                parts = [order[k * size : (k + 1) * size] for order in orders]
                # as wide as the longest member's batch: an epoch's short last batch is not padded to full size
                table = np.full((len(parts), max(len(part) for part in parts)), -1, dtype=np.int64)
                for member, part in enumerate(parts):
                    table[member, : len(part)] = part
                yield Step((epoch - 1) * spe + k, [table], [1.0])

    def compute(self, table: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """(sum over members of each one's mean loss, the per-pair losses, the margins) of one step."""
        valid = torch.as_tensor(table >= 0, device=self.runtime.device)
        rows = np.where(table >= 0, table, 0)
        both = torch.as_tensor(np.concatenate([rows, rows + len(self.sides[0])], axis=1), device=self.runtime.device)
        # (F, 2B, in): each member's chosen rows, then its rejected rows, in one gather
        x = torch.index_select(self.both, 0, both.reshape(-1)).view(*both.shape, self.both.shape[1])
        with self.runtime.autocast():
            rewards = self.net(x).float()
        chosen, rejected = rewards[:, : table.shape[1]], rewards[:, table.shape[1] :]
        losses = self.loss_of(chosen - rejected)
        weight = valid.to(losses.dtype)
        objective = ((losses * weight).sum(1) / weight.sum(1).clamp(min=1.0)).sum()
        return objective, losses[valid], (chosen - rejected).detach()[valid]

    def after_step(self, step: Step, losses: list[Tensor], extras: list[Any]) -> None:
        """The running loss over every member's pairs."""
        self.step_loss = torch.cat(losses).float()
        self.total += float(self.step_loss.sum())
        self.count += len(self.step_loss)

    def end_epoch(self, done: int) -> bool:
        """The epoch's row (mean training loss over the members); no validation, no early stop."""
        row = {"epoch": done // self.steps_per_epoch, "train_loss": self.total / max(self.count, 1)}
        self.epochs.history.append(row)
        return False


def fit_stacked(config: FitRewardConfig, sides: Sequence[Tensor], train_rows: Sequence[np.ndarray],
                seeds: Sequence[int]) -> StackedMLP:
    """Train one member per (``train_rows``, ``seeds``) entry on the prepared feature ``sides`` (chosen,
    rejected: (n, d) tensors); return the trained stack (eval mode). ``config`` must be :func:`stackable`."""
    reason = stackable(config)
    if reason is not None:
        raise ValueError(f"these fold models cannot train as one stack: {reason}")
    run = Run(RunSpec(FIT_REWARD, {}), None, device=config.device, precision=config.precision,
              report_to="none", resume=False)
    task = StackedTask(config, sides, train_rows, seeds, run)
    task.make_trainer()
    train_epochs(task, None)
    task.finish()
    return task.model.module


@torch.no_grad()
def stacked_margins(stack: StackedMLP, sides: Sequence[Tensor], device: torch.device | None = None) -> np.ndarray:
    """(members × rows) float64 margins r(chosen) − r(rejected) of every row under every member."""
    stack.eval()
    device = device or stack.weights[0].device
    members, rows = stack.members, sides[0].shape[0]
    out = np.empty((members, rows), dtype=np.float64)
    for start in range(0, rows, SCORE_ROWS):
        part = [side[start : start + SCORE_ROWS].to(device) for side in sides]
        rewards = [stack(p.unsqueeze(0).expand(members, -1, -1).contiguous()).float() for p in part]
        out[:, start : start + len(part[0])] = (rewards[0] - rewards[1]).cpu().numpy()
    return out


__all__ = ["SCORE_ROWS", "StackedMLP", "StackedTask", "fit_stacked", "stackable", "stacked_margins"]
