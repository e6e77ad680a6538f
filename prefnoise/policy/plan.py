"""What an align run will do, decided before anything is written: checked data, tokens, split, batches,
steps and a memory estimate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from prefnoise import columns as C
from prefnoise.batching import BatchSchedule, padding_fraction, pair_length
from prefnoise.errors import PrefnoiseError
from prefnoise.options.align import AlignConfig
from prefnoise.policy.logprobs import (
    TokenizedPairs,
    TokenizeSettings,
    template_uses_date,
    today,
    tokenize_pairs,
    uses_chat_template,
)
from prefnoise.policy.models import check_causal_lm, count_parameters, load_tokenizer
from prefnoise.resources import activation_bytes, model_dims, training_memory_bytes
from prefnoise.training import check_report_to, split_by_pair_id
from prefnoise.training import resolve_precision as resolve_precision_of


def batch_schedule(cfg: AlignConfig, pairs: TokenizedPairs, train_idx: list[int], processes: int) -> BatchSchedule:
    """The run's micro-batches (``prefnoise.batching``) over the training rows; indices are positions
    in ``train_idx``. A pair's length is its padded width: prompt plus the longer response."""
    lengths = [pair_length(len(pairs.prompt_ids[i]), len(pairs.chosen_ids[i]), len(pairs.rejected_ids[i]))
               for i in train_idx]
    return BatchSchedule(lengths, batch_size=cfg.batch_size, mode=cfg.batching,
                         max_tokens=cfg.max_tokens_per_batch, seed=cfg.seed, processes=processes)


def step_rows(schedule: BatchSchedule, step: int, cfg: AlignConfig, train_idx: list[int], rank: int
              ) -> tuple[list[list[int]], list[float]]:
    """Per micro-batch of optimizer step ``step``: this process's rows, and the divisor of its objective.

    The divisor makes the step's gradient that of the mean per-pair loss over every pair of the step
    (all micro-batches, all processes), also when micro-batches hold different numbers of pairs
    (group mode's last batch, a token budget): a micro-batch of n pairs out of T in the step, on one
    of P processes whose gradients are averaged, divides its mean loss by T / (n·P). With equal
    batches this is ``grad_accum``, as before.
    """
    groups = [schedule.locate(step * cfg.grad_accum + micro)[1] for micro in range(cfg.grad_accum)]
    total = sum(len(part) for group in groups for part in group)
    processes = len(groups[0])
    rows = [[train_idx[i] for i in group[rank]] for group in groups]
    return rows, [total / (len(group[rank]) * processes) for group in groups]


@dataclass
class Plan:
    """What a run will do: rows, tokens, steps, an estimate of peak training memory."""

    rows: int
    train_rows: int
    val_rows: int
    truncated_rows: int
    tokens: int
    max_sequence: int
    processes: int
    micro_batches_per_epoch: int  # in the first epoch (with a token budget the count varies by epoch)
    steps: int
    parameters: int
    trainable_parameters: int
    memory_estimate_bytes: int
    chat_template: bool
    chat_date: str | None = None  # the fixed date a date-rendering chat template sees in this run
    batching: str = "exact"
    padding_fraction: float = 0.0  # share of the first epoch's padded training tokens that are padding


def make_plan(cfg: AlignConfig, pairs: TokenizedPairs, val_mask: np.ndarray, config,
              processes: int = 1, schedule: BatchSchedule | None = None) -> Plan:
    """Counts and the step budget; PrefnoiseError if the training split cannot fill one batch."""
    train_rows = int((~val_mask).sum())
    global_micro = cfg.batch_size * processes
    if train_rows < global_micro:
        raise PrefnoiseError(f"only {train_rows} training rows, fewer than one batch "
                             f"({cfg.batch_size} x {processes} processes); lower --batch-size "
                             "or --val-fraction")
    if schedule is None:
        schedule = batch_schedule(cfg, pairs, np.flatnonzero(~val_mask).tolist(), processes)
    micro_per_epoch = len(schedule.epoch(0))
    steps = cfg.max_steps or max(1, schedule.micro_batches(cfg.epochs) // cfg.grad_accum)
    first = [part for group in schedule.epoch(0) for part in group]
    params, trainable = count_parameters(config, cfg.lora_r)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                  zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids, strict=True))
    act_bytes = 2 if resolve_precision(cfg, cuda_available()) == "bf16" else 4
    hidden, layers = model_dims(config)
    tokens_per_micro = 2 * cfg.batch_size * longest if cfg.max_tokens_per_batch is None \
        else max(cfg.max_tokens_per_batch, 2 * longest)  # a pair over the budget trains alone
    activations = activation_bytes(tokens_per_micro, layers, hidden, act_bytes,
                                   checkpointing=cfg.gradient_checkpointing, vocab=config.vocab_size)
    memory = training_memory_bytes(params, trainable, activations)
    return Plan(len(pairs), train_rows, len(pairs) - train_rows, pairs.truncated_rows,
                pairs.token_count(), longest, processes, micro_per_epoch, steps, params, trainable,
                memory, pairs.settings.chat_template, pairs.settings.chat_date, cfg.batching,
                round(padding_fraction(first, schedule.lengths), 4))


def cuda_available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def resolve_precision(cfg: AlignConfig, on_cuda: bool) -> str:
    """"bf16" or "fp32": auto picks bf16 autocast on a GPU that supports it."""
    return resolve_precision_of(cfg.precision, on_cuda)


@dataclass
class Prepared:
    """Checked inputs of a run: tokenizer, model config, tokenized pairs, split, plan."""

    tokenizer: Any
    config: Any
    pairs: TokenizedPairs
    val_mask: np.ndarray
    flipped: np.ndarray | None
    plan: Plan
    schedule: BatchSchedule | None = None  # the training micro-batches (positions in the training rows)


def check_pair_ids(frame: pl.DataFrame, source: str = "data") -> None:
    """PrefnoiseError naming the first pair_id shared by rows whose content differs (1-based rows).

    Rows that repeat a pair exactly (same pair_id, prompt, responses, flipped flag) may stay: they
    get the same reference log-probs, and the reference pass is assembled by row index.
    """
    content = [c for c in (C.PROMPT, C.PROMPT_MESSAGES, C.CHOSEN, C.REJECTED, C.FLIPPED) if c in frame.columns]
    indexed = frame.select(C.PAIR_ID, *content).with_row_index("__row", offset=1)
    shared = indexed.filter(pl.col(C.PAIR_ID).is_duplicated())
    if shared.height == 0:
        return
    conflicts = (shared.group_by(C.PAIR_ID, maintain_order=True)
                 .agg(pl.col("__row"), pl.struct(content).n_unique().alias("__variants"))
                 .filter(pl.col("__variants") > 1))
    if conflicts.height == 0:
        return
    pair_id, rows = conflicts.row(0)[:2]
    shown = ", ".join(str(r) for r in rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    raise PrefnoiseError(
        f"{source}: pair_id {pair_id!r} is shared by rows {shown} whose prompts, responses or labels "
        f"differ ({conflicts.height} such pair_id(s)); give each distinct pair its own pair_id")


def check_environment(cfg: AlignConfig) -> None:
    """PrefnoiseError when this machine cannot run ``cfg``: no CUDA for --device cuda, a tracker not installed."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PrefnoiseError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    check_report_to(cfg.report_to, cfg.out)


def prepare(cfg: AlignConfig, frame: pl.DataFrame, *, source: str = "data",
            processes: int = 1, chat_date: str | None = None) -> Prepared:
    """Check options, model and data, tokenize and split: everything before the first write.

    ``chat_date``: the date a date-rendering chat template sees (a resumed run's); default today.
    """
    check_environment(cfg)
    if frame.height == 0:
        raise PrefnoiseError(f"{source}: the dataset has no rows; align needs preference pairs")
    check_pair_ids(frame, source)
    config = check_causal_lm(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    chat = uses_chat_template(frame, tokenizer)
    date = (chat_date or today()) if chat and template_uses_date(tokenizer) else None
    settings = TokenizeSettings(cfg.max_length, cfg.max_prompt_length, chat, date)
    pairs = tokenize_pairs(frame, tokenizer, settings, source=source)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and cfg.max_length > positions:
        longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                      zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids, strict=True))
        if longest > positions:
            raise PrefnoiseError(f"--max-length {cfg.max_length} lets sequences reach {longest} "
                                 f"tokens but the model has {positions} positions; lower --max-length")
    val_mask = split_by_pair_id(pairs.pair_ids, cfg.val_fraction, cfg.seed)
    flipped = frame[C.FLIPPED].fill_null(False).to_numpy() if C.FLIPPED in frame.columns else None
    schedule = batch_schedule(cfg, pairs, np.flatnonzero(~val_mask).tolist(), processes)
    plan = make_plan(cfg, pairs, val_mask, config, processes, schedule)
    return Prepared(tokenizer, config, pairs, val_mask, flipped, plan, schedule)
