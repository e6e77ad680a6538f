"""The one preference-optimization trainer: SymPO and the DPO family on a causal LM.

``train``: prepare (tokens, split, plan), the run (:class:`prefnoise.training.run.Run`: accelerator,
output directory, resume, metrics log, trackers, checkpoints), the policy, the reference pass (cached),
the step loop, the final save.

Output directory ``out``::

    metrics.jsonl          one JSON object per logging step (split "train") and evaluation ("val")
    ref_logps.parquet      cached reference log-probs (unless ``ref_cache`` points elsewhere)
    checkpoints/step-N/    latest checkpoint: accelerate state (model, optimizer, RNG) + trainer.json
                           (options, chat date, fingerprints of the data and the model)
    model/                 final weights (merged) or the LoRA adapter, with the tokenizer
    summary.json           the summary ``train`` returns

Data-parallel under ``accelerate launch``: process r of P takes rows [r·B, (r+1)·B) of each global
micro-batch of P·B rows, so P processes at batch B see exactly what one process sees at batch P·B.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from prefnoise.atomic import atomic_write_text
from prefnoise.losses import policy_objective
from prefnoise.options.align import LEGACY_OPTIONS, RESUME_FREE, AlignConfig
from prefnoise.policy.fingerprints import (
    data_fingerprint,
    describe_data_change,
    describe_model_change,
    model_fingerprint,
)
from prefnoise.policy.logprobs import collate_pairs, pad_token_id, pair_logps
from prefnoise.policy.models import ALIGN_COMMAND, load_policy, save_final_model, weights_digest
from prefnoise.policy.objective import (
    diverged,
    eps_of,
    evaluate_rows,
    loss_level,
    loss_of,
    loss_params_of,
    response_tokens,
    train_record,
)
from prefnoise.policy.plan import Prepared, check_environment, prepare, step_rows
from prefnoise.policy.reference import reference_of
from prefnoise.resources import check_fits_in_memory
from prefnoise.training import CHECKPOINTS_DIR, METRICS_FILE, Trainer
from prefnoise.training.loop import Cadence, Step, fit
from prefnoise.training.run import Run, RunSpec

MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"


def train(cfg: AlignConfig, frame: pl.DataFrame, *, source: str = "data",
          on_progress: Callable[[int], None] | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None,
          notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the policy on ``frame`` (canonical pairs) and save it under ``cfg.out``; return the summary.

    ``on_progress(n)`` advances by n optimizer steps; ``on_log(record)`` sees each metrics record
    (an exception it raises stops training, as an interruption would); ``notes`` join the summary (e.g.
    where ε came from).
    """
    check_environment(cfg)  # before the accelerator: --report-to must name an installed tracker
    spec = RunSpec(ALIGN_COMMAND, asdict(cfg), free=RESUME_FREE, legacy=LEGACY_OPTIONS,
                   clear=(CHECKPOINTS_DIR, MODEL_DIR, METRICS_FILE, SUMMARY_FILE))  # the reference cache stays
    run = Run(spec, cfg.out, device=cfg.device, precision=cfg.precision, report_to=cfg.report_to, resume=cfg.resume)
    prepared = prepare(cfg, frame, source=source, processes=run.accelerator.num_processes,
                       chat_date=run.saved.get("chat_date") if run.saved else None)
    device = run.accelerator.device
    if device.type == "cpu" or run.accelerator.num_processes == 1:  # before the model is loaded: a run that
        plan = prepared.plan  # cannot fit stops here (FSDP shards the estimate over processes: not checked)
        check_fits_in_memory(plan.memory_estimate_bytes, f"align on {cfg.model} ({plan.parameters:,} parameters, "
                             f"{plan.trainable_parameters:,} trained)", "lower --batch-size or --max-length, or train "
                             "LoRA adapters (--lora-r) with --gradient-checkpointing", device=device)
    started = time.perf_counter()
    # What a checkpoint must match to be resumed, besides the options: the data and the model.
    run_state = {"chat_date": prepared.pairs.settings.chat_date, "data": data_fingerprint(prepared.pairs),
                 "model": model_fingerprint(cfg.model)}
    run.check_options()
    run.check_same("model", run_state["model"], "model", describe_model_change,  # older checkpoints: options only
                   "use the same --model or start over with --overwrite")
    run.check_same("data", run_state["data"], "data", describe_data_change,
                   "use the same data or start over with --overwrite")
    run.start(on_log=on_log)  # from here on files are written: all checks have passed
    task = PolicyTask(cfg, prepared, run, run_state, source)
    task.on_progress = on_progress
    if task.start_step == 0:
        task.evaluate(0)
    fit(task, run, Cadence(cfg.log_every, cfg.eval_every, cfg.save_every), task.start_step)
    summary = task.finish(started, notes or {})
    run.end()
    return summary


class PolicyTask:
    """The policy, its reference log-probs and the shared trainer: what an align run trains."""

    def __init__(self, cfg: AlignConfig, prepared: Prepared, run: Run, run_state: dict[str, Any],
                 source: str = "data") -> None:
        self.cfg, self.prepared, self.run, self.run_state, self.source = cfg, prepared, run, run_state, source
        self.plan, self.pairs, accelerator = prepared.plan, prepared.pairs, run.accelerator
        self.accelerator, self.rank, self.processes = accelerator, accelerator.process_index, accelerator.num_processes
        torch.manual_seed(cfg.seed)
        model = load_policy(cfg, prepared.config).to(accelerator.device)
        self.ref_chosen, self.ref_rejected, self.cache_path, self.cache_hit = reference_of(
            cfg, prepared, model, accelerator)
        # The shared trainer: AdamW, the learning rate as a pure function of the step, clipping.
        self.trainer = Trainer(accelerator, model, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                               warmup_steps=cfg.warmup_steps, total_steps=self.plan.steps,
                               max_grad_norm=cfg.max_grad_norm, fail=self.fail)
        self.model = self.trainer.model
        self.model.train()
        self.train_idx = np.flatnonzero(~prepared.val_mask).tolist()
        self.val_idx = np.flatnonzero(prepared.val_mask).tolist()
        self.start_step = run.restore()  # checked against this run before anything was written
        run.open_trackers()
        self.pad_id = pad_token_id(prepared.tokenizer)
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.last_train: dict[str, Any] = {}
        self.total_steps = self.plan.steps
        self.on_progress: Callable[[int], None] | None = None

    def fail(self, what: str, value: float | None, step: int, after: bool = False):
        """The error of a run that diverged at optimizer step ``step``."""
        return diverged(what, value, step, self.plan, self.cfg, after=after)

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """The held-out record at ``step`` (logged), or None without validation rows."""
        if not self.val_idx:
            return None
        record = evaluate_rows(self.model, self.pairs, self.val_idx[self.rank::self.processes], self.ref_chosen,
                               self.ref_rejected, self.prepared, self.cfg, self.accelerator, step)
        if not math.isfinite(record["margin"]):  # the same on every process (gathered margins)
            raise self.fail("the validation margins", record["margin"], step, after=True)
        self.run.log(record)
        return record

    def compute(self, rows: list[int]):
        """(objective, per-row losses, (objective, chosen rewards, rejected rewards)) of micro-batch ``rows``."""
        cfg, device = self.cfg, self.accelerator.device
        cpu_batch = collate_pairs(self.pairs, rows, self.pad_id)
        self.window_tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU: no device sync
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        with self.accelerator.autocast():
            chosen_logps, rejected_logps = pair_logps(self.model, batch)
        losses, chosen_rewards, rejected_rewards = loss_of(
            cfg, chosen_logps, rejected_logps, self.ref_chosen[rows].to(device), self.ref_rejected[rows].to(device),
            response_tokens(batch))
        objective = policy_objective(cfg.loss, losses, beta_prime=cfg.beta_prime)
        return objective, losses, (objective.detach(), chosen_rewards, rejected_rewards)

    def steps(self, start: int) -> Iterator[Step]:
        """The optimizer steps from ``start``: this process's rows of each micro-batch, and their divisors."""
        for index in range(start, self.total_steps):
            rows, divisors = step_rows(self.prepared.schedule, index, self.cfg, self.train_idx, self.rank)
            yield Step(index, rows, divisors)

    def after_step(self, step: Step, losses: list[torch.Tensor], extras: list[Any]) -> None:
        """Advance the progress by one step (main process)."""
        if self.on_progress and self.run.main:
            self.on_progress(1)

    def train_record(self, done: int, losses: list[torch.Tensor], extras: list[Any]) -> dict[str, Any]:
        """The train record of optimizer step ``done`` (1-based), with the tokens per second since the last."""
        elapsed = time.perf_counter() - self.window_start
        tokens = int(self.accelerator.reduce(torch.tensor(self.window_tokens, device=self.accelerator.device),
                                             reduction="sum"))
        self.last_train = train_record(
            done, done - 1, self.plan, self.cfg, self.accelerator, losses, [e[1] for e in extras],
            [e[2] for e in extras], tokens / max(elapsed, 1e-9), [e[0] for e in extras],
            epoch=self.prepared.schedule.epoch_of(done * self.cfg.grad_accum))
        self.window_tokens, self.window_start = 0, time.perf_counter()
        return self.last_train

    def epoch_end(self, done: int) -> bool:
        """align evaluates by ``eval_every``, not at epoch ends."""
        return False

    def end_epoch(self, done: int) -> bool:
        """Never called (no epoch ends); nothing stops a run early."""
        return False

    def state(self) -> dict[str, Any]:
        """A checkpoint keeps the chat date and the fingerprints of the data and the model."""
        return self.run_state

    def write_extra(self, directory: Path) -> None:
        """align's checkpoints need nothing beyond accelerate's state."""

    def finish(self, started: float, notes: dict[str, Any]) -> dict[str, Any]:
        """Check the final weights, evaluate, save the model and the summary; return the summary."""
        from accelerate.utils import gather_object  # heavy: accelerate's utils load torch.distributed

        cfg, plan, out = self.cfg, self.plan, Path(self.cfg.out)
        self.trainer.watch.check(self.model)  # the last updates: no model with a NaN or inf weight is ever saved
        if not self.val_idx:  # no validation pass: a batch of training rows shows whether log-probs stay finite
            probe = evaluate_rows(self.model, self.pairs, self.train_idx[self.rank::self.processes][:cfg.batch_size],
                                  self.ref_chosen, self.ref_rejected, self.prepared, cfg, self.accelerator, plan.steps)
            if not math.isfinite(probe["margin"]):
                raise self.fail("the margins", probe["margin"], plan.steps, after=True)
        final_eval = self.evaluate(plan.steps)
        digests = gather_object([weights_digest(self.accelerator.unwrap_model(self.model))])
        save_final_model(self.accelerator, self.model, self.prepared.tokenizer, out / MODEL_DIR, cfg,
                         self.prepared.config)
        summary = {
            "input": self.source, "output": str(out), "model": str(out / MODEL_DIR), "loss": cfg.loss, **eps_of(cfg),
            "loss_params": loss_params_of(cfg), "loss_level": loss_level(cfg),
            **{k: v for k, v in asdict(plan).items() if k != "memory_estimate_bytes"},
            "memory_estimate_bytes": plan.memory_estimate_bytes,
            "resumed_from_step": self.start_step if self.run.resume_from else None,
            "ref_cache": str(self.cache_path), "ref_cache_hit": self.cache_hit,
            "weights_agree": len(set(digests)) == 1,  # every process ends with the same weights
            "train": self.last_train, "val": final_eval,
            "seconds": round(time.perf_counter() - started, 3), **notes,
        }
        if self.run.main:
            atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary
