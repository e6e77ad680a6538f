"""Align's numbers: the loss of a batch from the losses table, train records, held-out evaluation, and
the error of a diverging run. Nothing here knows a formula: every loss is
:func:`prefnoise.losses.preference_loss`."""

from __future__ import annotations

import math
from typing import Any

import torch

from prefnoise.errors import PrefnoiseError
from prefnoise.loss_names import POLICY_RATE_OPTIONS
from prefnoise.losses import implicit_rewards, preference_loss
from prefnoise.options.align import AlignConfig
from prefnoise.policy.logprobs import collate_pairs, pad_token_id, pair_logps
from prefnoise.policy.plan import Plan
from prefnoise.training import learning_rate as scheduled_lr
from prefnoise.training import nonfinite_name, reshard


def learning_rate(step: int, total_steps: int, cfg: AlignConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the decay schedule
    (:func:`prefnoise.training.learning_rate` with the run's options)."""
    return scheduled_lr(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup_steps)


def reward_accuracy(margins: torch.Tensor, correct_sign: torch.Tensor | None = None) -> float:
    """Fraction of pairs whose margin z has the labelled sign (z > 0), ties counting one half.

    ``correct_sign`` (+1/−1 per pair) scores against other labels, e.g. −1 for flipped pairs.
    """
    signed = margins if correct_sign is None else margins * correct_sign
    return float(((signed > 0).double() + 0.5 * (signed == 0).double()).mean())


def diverged(what: str, value: float | None, step: int, plan: Plan, cfg: AlignConfig, *,
             after: bool = False) -> PrefnoiseError:
    """The error that stops a diverging run at optimizer step ``step`` (1-based; 0: before training)."""
    shown = f" ({nonfinite_name(value)})" if value is not None and not math.isfinite(value) else ""
    if step == 0:
        return PrefnoiseError(f"{what} were non-finite{shown} before any training step: --model "
                              f"{cfg.model} is damaged (NaN or inf weights or log-probabilities)")
    epoch = (step - 1) * cfg.grad_accum // plan.micro_batches_per_epoch + 1
    where = f"{'after' if after else 'at'} epoch {epoch}, step {step}"
    return PrefnoiseError(f"training diverged: {what} became non-finite{shown} {where}; "
                          "lower --lr or check the data; no model was saved")


def loss_of(cfg: AlignConfig, chosen_logps, rejected_logps, ref_chosen, ref_rejected, tokens=None):
    """(elementwise losses, chosen rewards, rejected rewards) from the losses table for ``cfg.loss``.

    ``tokens``: (chosen, rejected) response token counts (:func:`response_tokens`), which ipo needs.
    """
    chosen_tokens, rejected_tokens = tokens if tokens is not None else (None, None)
    return preference_loss(
        cfg.loss, chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=cfg.beta,
        symmetric_loss=cfg.symmetric_loss, clip=cfg.clip, label_smoothing=cfg.label_smoothing,
        noise_rate=cfg.noise_rate, tau=cfg.tau, alpha=cfg.alpha, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens)


def response_tokens(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) counts of the scored response tokens of a ``collate_pairs`` batch."""
    counts = batch["labels_mask"][:, 1:].sum(-1).float()  # token t is scored from position t-1
    half = counts.shape[0] // 2
    return counts[:half], counts[half:]


def eps_of(cfg: AlignConfig) -> dict[str, float]:
    """{"eps": ε} for cdpo (--label-smoothing) and rdpo (--noise-rate); {} for other losses."""
    option = POLICY_RATE_OPTIONS.get(cfg.loss)
    return {"eps": getattr(cfg, option)} if option else {}


def loss_params_of(cfg: AlignConfig) -> dict[str, Any]:
    """The loss parameters in effect for ``cfg.loss`` (as summaries report them)."""
    params: dict[str, dict[str, Any]] = {
        "sympo": {"symmetric_loss": cfg.symmetric_loss, "clip": cfg.clip},
        "ipo": {"tau": cfg.beta if cfg.tau is None else cfg.tau},
        "ropo": {"alpha": cfg.alpha},
        "drdpo": {"beta_prime": cfg.beta_prime},
    }
    return {"beta": cfg.beta, **eps_of(cfg), **params.get(cfg.loss, {})}


def loss_level(cfg: AlignConfig) -> str:
    """"batch" for drdpo (no per-row loss: train records' loss is its batch objective), else "row"."""
    return "batch" if cfg.loss == "drdpo" else "row"


def train_record(done, step, plan, cfg, accelerator, losses, chosen, rejected, tokens_per_s, objectives=None,
                 epoch=None):
    """The metrics record of one optimizer step, gathered over processes (``epoch``: epochs done, by default
    from the first epoch's micro-batch count).

    ``loss`` is the mean per-row loss, except for drdpo (batch-level): there it is the mean over
    micro-batches of −β′·log mean exp(−ℓ/β′), and ``dpo_row_loss`` is the mean per-row DPO ℓ.
    """
    losses = accelerator.gather(torch.cat(losses)).float()
    batch_level = {}
    if cfg.loss == "drdpo" and objectives:
        batch_loss = float(accelerator.gather(torch.stack(objectives).reshape(-1)).float().mean())
        batch_level = {"loss": batch_loss, "dpo_row_loss": float(losses.mean()), "loss_level": "batch"}
    chosen = accelerator.gather(torch.cat(chosen)).float()
    rejected = accelerator.gather(torch.cat(rejected)).float()
    margins = chosen - rejected
    return {
        "split": "train", "step": done,
        "epoch": round(done * cfg.grad_accum / plan.micro_batches_per_epoch if epoch is None else epoch, 4),
        "lr": learning_rate(step, plan.steps, cfg), "loss": float(losses.mean()),
        "reward_accuracy": reward_accuracy(margins), "margin": float(margins.mean()),
        "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
        "tokens_per_s": round(tokens_per_s, 1), **eps_of(cfg), **batch_level,
    }


@torch.no_grad()
def evaluate_rows(model, pairs, rows, ref_chosen, ref_rejected, run, cfg, accelerator, step):
    """Held-out implicit-reward accuracy vs the given labels (and vs clean labels when known)."""
    model.eval()
    pad_id = pad_token_id(run.tokenizer)
    margins, indices = [], []
    size = 2 * cfg.batch_size
    chunks = math.ceil(len(rows) / size)
    if accelerator.num_processes > 1:  # as many forwards on every process: FSDP's are collective
        chunks = int(accelerator.gather(torch.tensor([chunks], device=accelerator.device)).max())
    for start in range(0, chunks * size, size):
        chunk = rows[start:start + size]
        filler = not chunk  # this process has no rows left: a forward whose result is dropped
        if filler:
            chunk = rows[:1] or [0]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs(pairs, chunk, pad_id).items()}
        with accelerator.autocast():
            chosen, rejected = pair_logps(model, batch)
        if filler:
            continue
        z = (implicit_rewards(chosen.float().cpu(), ref_chosen[chunk], cfg.beta)
             - implicit_rewards(rejected.float().cpu(), ref_rejected[chunk], cfg.beta))
        margins += z.tolist()
        indices += chunk
    model.train()
    reshard(model)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object  # heavy: accelerate, launched runs only

        gathered = gather_object(list(zip(indices, margins, strict=True)))
        indices, margins = [i for i, _ in gathered], [m for _, m in gathered]
    z = torch.tensor(margins, dtype=torch.float64)
    record = {"split": "val", "step": step, "rows": len(indices),
              "reward_accuracy": reward_accuracy(z), "margin": float(z.mean()), **eps_of(cfg)}
    if run.flipped is not None:
        sign = 1.0 - 2.0 * torch.tensor(run.flipped[indices], dtype=torch.float64)
        record["clean_reward_accuracy"] = reward_accuracy(z, sign)
    return record
