"""The one preference-optimization trainer: SymPO and the DPO family on a causal LM.

Read top to bottom: configuration, checks, the plan (tokens, steps, memory), then ``train``:
load, tokenize, split, reference pass (cached), the step loop, checkpoints, final save.
Every loss comes from ``prefnoise.losses.preference_loss``; nothing here knows a formula.

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

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from prefnoise import columns as C
from prefnoise.atomic import atomic_path, atomic_write_text
from prefnoise.batching import (
    BATCHING_MODES,
    BatchSchedule,
    epoch_permutation,  # noqa: F401  (re-exported: benches replay exact order)
    padding_fraction,
    pair_length,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.hf import check_model_dir, check_weights, from_pretrained, quiet_transformers
from prefnoise.logprobs import (
    REF_CHOSEN,
    REF_REJECTED,
    TokenizedPairs,
    TokenizeSettings,
    collate_pairs,
    pad_token_id,
    pair_logps,
    read_reference_cache,
    reference_fingerprint,
    reference_logps,
    template_uses_date,
    today,
    tokenize_pairs,
    uses_chat_template,
    write_reference_cache,
)
from prefnoise.loss_names import POLICY_RATE_OPTIONS, missing_rate
from prefnoise.losses import MARGIN_LOSSES, POLICY_LOSSES, implicit_rewards, policy_objective, preference_loss
from prefnoise.outputs import check_output_dir, write_marker
from prefnoise.reward.split import split_by_pair_id
from prefnoise.reward.validate import nonfinite_name
from prefnoise.training import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    PRECISIONS,
    SCHEDULES,
    MetricsLog,
    Trainer,
    changed_options,
    check_report_to,
    latest_checkpoint,
    make_accelerator,
    read_trainer_state,
    reshard,
    start_trackers,
    truncate_metrics,
)
from prefnoise.training import learning_rate as scheduled_lr
from prefnoise.training import resolve_precision as resolve_precision_of
from prefnoise.training import save_checkpoint as save_training_state

DEVICES = ("auto", "cpu", "cuda")
REF_CACHE_FILE = "ref_logps.parquet"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
ALIGN_COMMAND = "align"  # the marker in --out (prefnoise.outputs)


@dataclass
class AlignConfig:
    """Every option of ``prefnoise align``; plain values with the defaults users get."""

    model: str
    out: str
    loss: str = "sympo"
    symmetric_loss: str = "sigmoid"
    beta: float = 0.1
    clip: float | None = 10.0  # SymPO's bound on each implicit reward
    label_smoothing: float | None = None  # cdpo's ε: required for cdpo, no default
    noise_rate: float | None = None  # rdpo's ε: required for rdpo, no default
    tau: float | None = None  # ipo; None means β
    alpha: float = 14.0  # ropo
    beta_prime: float = 1.0  # drdpo's β′ (Dr. DPO's default)
    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    batch_size: int = 8
    batching: str = "group"  # prefnoise.batching: "exact" is the plain shuffled order (loss-parity tests)
    max_tokens_per_batch: int | None = None  # group mode: padded tokens per micro-batch instead of batch_size
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = C.DEFAULT_SEED
    max_length: int = 512
    max_prompt_length: int | None = None  # None: min(256, max_length // 2)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    save_adapter: bool = False
    save_every: int = 0
    resume: bool = False
    ref_cache: str | None = None
    val_fraction: float = 0.0
    eval_every: int = 0  # 0: evaluate before training and at the end only
    log_every: int = 10
    precision: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    report_to: str = "none"  # prefnoise.training.REPORT_TO: trackers logging under out/runs

    def __post_init__(self) -> None:
        if self.max_prompt_length is None and isinstance(self.max_length, int):
            self.max_prompt_length = default_max_prompt_length(self.max_length)


def default_max_prompt_length(max_length: int) -> int:
    """Prompt tokens kept when ``--max-prompt-length`` is not given: 256, or half of a shorter --max-length."""
    return min(256, max_length // 2)


# Options check_config requires to be finite numbers (clip and tau may also be None), and integers.
FLOAT_OPTIONS = ("beta", "clip", "label_smoothing", "noise_rate", "tau", "alpha", "beta_prime", "lr",
                 "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout", "val_fraction")
OPTIONAL_FLOATS = ("clip", "tau", "label_smoothing", "noise_rate")  # may be None
INT_OPTIONS = ("warmup_steps", "batch_size", "grad_accum", "epochs", "max_steps", "seed", "max_length",
               "max_prompt_length", "lora_r", "save_every", "eval_every", "log_every", "max_tokens_per_batch")

# Options that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("out", "resume", "save_every", "log_every", "eval_every", "ref_cache", "device", "report_to")
# What a checkpoint written before an option existed ran with.
LEGACY_OPTIONS = {"batching": "exact", "max_tokens_per_batch": None}


def check_config(cfg: AlignConfig) -> None:
    """Raise PrefnoiseError on any invalid option (before anything is loaded or written)."""
    def bad(message: str) -> None:
        raise PrefnoiseError(message)

    if cfg.loss not in POLICY_LOSSES:
        bad(f"--loss must be one of {', '.join(POLICY_LOSSES)}, not {cfg.loss!r}")
    symmetric = [n for n, e in MARGIN_LOSSES.items() if e.symmetric]
    if cfg.symmetric_loss not in symmetric:
        bad(f"--symmetric-loss must be one of {', '.join(symmetric)}, not {cfg.symmetric_loss!r}")
    # Every float option must be a finite number first: `nan > 0` is False but so is `nan < 0`,
    # and inf passes every lower bound (an inf --lr trains garbage).
    for name in FLOAT_OPTIONS:
        value = getattr(cfg, name)
        if value is None and name in OPTIONAL_FLOATS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in INT_OPTIONS:
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            bad(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    missing = missing_rate(cfg.loss, asdict(cfg), POLICY_RATE_OPTIONS)
    if missing:
        bad(missing)
    if not cfg.alpha > 0:
        bad(f"--alpha must be > 0, got {cfg.alpha}")
    if not cfg.beta_prime > 0:
        bad(f"--beta-prime must be > 0, got {cfg.beta_prime}")
    for flag, value in (("--weight-decay", cfg.weight_decay), ("--max-grad-norm", cfg.max_grad_norm)):
        if value < 0:
            bad(f"{flag} must be >= 0, got {value}")
    if not cfg.lora_alpha > 0:
        bad(f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.beta > 0:
        bad(f"--beta must be > 0, got {cfg.beta}")
    for flag, eps in (("--label-smoothing", cfg.label_smoothing), ("--noise-rate", cfg.noise_rate)):
        if eps is not None and not 0.0 <= eps < 0.5:
            bad(f"{flag} must be in [0, 0.5), got {eps}")
    if cfg.clip is not None and not cfg.clip > 0:
        bad(f"--clip must be > 0, got {cfg.clip}")
    if cfg.tau is not None and not cfg.tau > 0:
        bad(f"--tau must be > 0, got {cfg.tau}")
    if not cfg.lr > 0:
        bad(f"--lr must be > 0, got {cfg.lr}")
    for flag, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                        ("--epochs", cfg.epochs), ("--max-length", cfg.max_length),
                        ("--log-every", cfg.log_every)):
        if value < 1:
            bad(f"{flag} must be >= 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.batching not in BATCHING_MODES:
        bad(f"--batching must be one of {', '.join(BATCHING_MODES)}, not {cfg.batching!r}")
    if cfg.max_tokens_per_batch is not None:
        if cfg.max_tokens_per_batch < 1:
            bad(f"--max-tokens-per-batch must be >= 1, got {cfg.max_tokens_per_batch}")
        if cfg.batching == "exact":
            bad("--max-tokens-per-batch needs --batching group (exact keeps fixed batches of --batch-size)")
    if not 0 <= cfg.max_prompt_length < cfg.max_length:
        bad(f"--max-prompt-length must be in [0, --max-length={cfg.max_length}), "
            f"got {cfg.max_prompt_length}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        bad(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.schedule not in SCHEDULES:
        bad(f"--schedule must be one of {', '.join(SCHEDULES)}, not {cfg.schedule!r}")
    if cfg.precision not in PRECISIONS:
        bad(f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")
    if cfg.device not in DEVICES:
        bad(f"--device must be one of {', '.join(DEVICES)}, not {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if min(cfg.warmup_steps, cfg.save_every, cfg.eval_every, cfg.lora_r) < 0:
        bad("--warmup-steps, --save-every, --eval-every and --lora-r must be >= 0")
    if cfg.save_adapter and cfg.lora_r == 0:
        bad("--save-adapter needs a LoRA run (--lora-r > 0)")
    check_report_to(cfg.report_to, cfg.out)


# --- model loading ---------------------------------------------------------------------------------

def check_causal_lm(model_path: str | Path):
    """The model's config after checking the path is a local causal-LM directory; else PrefnoiseError.

    Also checks the weights (present, readable, shaped as the config says) so that a damaged
    directory fails here, before ``train`` writes anything. No code from the directory runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = check_model_dir(model_path, "--model")
    config = from_pretrained(AutoConfig, path, what="--model")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    ok = any(a in causal for a in architectures) if architectures else (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not ok:
        found = ", ".join(architectures) or config.model_type
        raise PrefnoiseError(f"--model {model_path}: not a causal language model ({found}); "
                             "align needs a decoder such as GPT-2 or Llama")
    check_weights(AutoModelForCausalLM, path, "--model", config)
    return config


def load_tokenizer(model_path: str | Path):
    """The tokenizer saved beside the model; PrefnoiseError if there is none or it is damaged."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, model_path, what="--model")


def load_policy(cfg: AlignConfig, config) -> torch.nn.Module:
    """The causal LM to train, dropout off (as TRL does) and, with --lora-r, wrapped by peft."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Dropout would make the policy differ from the reference at step 0 and add noise to z.
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    hf_logging.disable_progress_bar()
    model = from_pretrained(AutoModelForCausalLM, cfg.model, what="--model", config=config, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model


# --- schedule, split, metrics ------------------------------------------------------------------------

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


# --- plan -----------------------------------------------------------------------------------------

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
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    tokens_per_micro = 2 * cfg.batch_size * longest if cfg.max_tokens_per_batch is None \
        else max(cfg.max_tokens_per_batch, 2 * longest)  # a pair over the budget trains alone
    # weights (fp32) + grads and two Adam moments for trainable ones; activations ~ 20·d per
    # token per layer (less with checkpointing); logits in fp32 with their gradient.
    per_layer = hidden * 20 * act_bytes * (0.1 if cfg.gradient_checkpointing else 1.0)
    activations = tokens_per_micro * (layers * per_layer + config.vocab_size * 8)
    memory = int(4 * params + 12 * trainable + activations)
    return Plan(len(pairs), train_rows, len(pairs) - train_rows, pairs.truncated_rows,
                pairs.token_count(), longest, processes, micro_per_epoch, steps, params, trainable,
                memory, pairs.settings.chat_template, pairs.settings.chat_date, cfg.batching,
                round(padding_fraction(first, schedule.lengths), 4))


def count_parameters(config, lora_r: int) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if not lora_r:
        return total, total
    from transformers.pytorch_utils import Conv1D

    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and "lm_head" not in name:
            rows, cols = module.weight.shape
            adapter += lora_r * (rows + cols)
    return total + adapter, adapter


def cuda_available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def resolve_precision(cfg: AlignConfig, on_cuda: bool) -> str:
    """"bf16" or "fp32": auto picks bf16 autocast on a GPU that supports it."""
    return resolve_precision_of(cfg.precision, on_cuda)


# --- preparation shared by plan and train ------------------------------------------------------

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


def prepare(cfg: AlignConfig, frame: pl.DataFrame, *, source: str = "data",
            processes: int = 1, chat_date: str | None = None) -> Prepared:
    """Check options, model and data, tokenize and split: everything before the first write.

    ``chat_date``: the date a date-rendering chat template sees (a resumed run's); default today.
    """
    check_config(cfg)
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


# --- training ---------------------------------------------------------------------------------------

def train(
    cfg: AlignConfig,
    frame: pl.DataFrame,
    *,
    source: str = "data",
    on_progress: Callable[[int], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the policy on ``frame`` (canonical pairs) and save it under ``cfg.out``; return the summary.

    ``on_progress(n)`` advances by n optimizer steps; ``on_log(record)`` sees each metrics record
    (an exception it raises stops training, as an interruption would).
    """
    from accelerate.utils import gather_object

    check_config(cfg)  # before the accelerator: --report-to must name an installed tracker
    accelerator = make_accelerator(cfg.device, cfg.precision, report_to=cfg.report_to, run_dir=cfg.out)
    rank, processes, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(cfg.out)
    checkpoints = out / CHECKPOINTS_DIR
    resume_from = latest_checkpoint(checkpoints) if cfg.resume else None
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    run = prepare(cfg, frame, source=source, processes=processes,
                  chat_date=saved.get("chat_date") if saved else None)
    pairs, plan = run.pairs, run.plan
    started = time.perf_counter()
    # What a checkpoint must match to be resumed, besides the options: the data and the model.
    run_state = {"chat_date": pairs.settings.chat_date, "data": data_fingerprint(pairs),
                 "model": model_fingerprint(cfg.model)}
    if saved is not None:
        check_resumable(cfg, saved["config"], resume_from, saved_run=saved, run=run_state)

    # From here on files are written: all checks have passed.
    if main:
        check_output_dir(out, command=ALIGN_COMMAND, overwrite=True, resume=True)  # never a foreign directory
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, ALIGN_COMMAND)  # lists what is there now (ownership was just checked)
        if resume_from is None:  # starting over in an earlier align output: clear what that run wrote,
            # keeping the reference cache (keyed by model and data, so still valid)
            for directory in (checkpoints, out / MODEL_DIR):
                shutil.rmtree(directory, ignore_errors=True)
            for file in (METRICS_FILE, SUMMARY_FILE):
                (out / file).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.seed)
    model = load_policy(cfg, run.config).to(accelerator.device)

    # Reference log-probs: read from the cache or one no-grad pass, sharded over processes.
    precision = resolve_precision(cfg, accelerator.device.type == "cuda")
    fingerprint = reference_fingerprint(cfg.model, pairs.settings, precision)
    cache_path = Path(cfg.ref_cache) if cfg.ref_cache else out / REF_CACHE_FILE
    ref = read_reference_cache(cache_path, fingerprint, pairs)
    ref_cache_hit = ref is not None
    if ref is None:
        shard_rows = range(rank, len(pairs), processes)
        shard = pairs.subset(shard_rows)
        base = model.disable_adapter() if cfg.lora_r else contextlib.nullcontext()
        with base, accelerator.autocast():
            part = reference_logps(model, shard, pad_id=pad_token_id(run.tokenizer),
                                   batch_size=2 * cfg.batch_size, device=accelerator.device)
        indexed = list(zip(shard_rows, part.rows(), strict=True))
        ref = assemble_reference(gather_object(indexed) if processes > 1 else indexed, len(pairs), part.schema)
        if main:
            write_reference_cache(ref, cache_path, fingerprint)
        accelerator.wait_for_everyone()
    ref_chosen = torch.tensor(ref[REF_CHOSEN].to_numpy(), dtype=torch.float32)
    ref_rejected = torch.tensor(ref[REF_REJECTED].to_numpy(), dtype=torch.float32)

    # The shared trainer: AdamW, the learning rate as a pure function of the step, clipping.
    trainer = Trainer(accelerator, model, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                      warmup_steps=cfg.warmup_steps, total_steps=plan.steps, max_grad_norm=cfg.max_grad_norm,
                      fail=lambda what, value, step, after=False: diverged(what, value, step, plan, cfg,
                                                                           after=after))
    model = trainer.model
    model.train()

    train_idx = np.flatnonzero(~run.val_mask).tolist()
    val_idx = np.flatnonzero(run.val_mask).tolist()

    start_step = 0
    if resume_from is not None:  # checked against this run before anything was written
        accelerator.load_state(str(resume_from))
        start_step = saved["step"]
        if main:
            truncate_metrics(out / METRICS_FILE, start_step)

    log = MetricsLog(accelerator, out / METRICS_FILE, report_to=cfg.report_to, on_log=on_log)
    start_trackers(accelerator, cfg.report_to, "align", asdict(cfg))

    def evaluate(step: int) -> dict[str, Any] | None:
        if not val_idx:
            return None
        record = evaluate_rows(model, pairs, val_idx[rank::processes], ref_chosen, ref_rejected,
                               run, cfg, accelerator, step)
        if not math.isfinite(record["margin"]):  # the same on every process (gathered margins)
            raise diverged("the validation margins", record["margin"], step, plan, cfg, after=True)
        log(record)
        return record

    watch = trainer.watch
    pad_id = pad_token_id(run.tokenizer)
    if start_step == 0:
        evaluate(0)
    last_train: dict[str, Any] = {}
    window_tokens, window_start = 0, time.perf_counter()
    def compute(rows: list[int]):
        nonlocal window_tokens
        cpu_batch = collate_pairs(pairs, rows, pad_id)
        window_tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU: no device sync
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in cpu_batch.items()}
        with accelerator.autocast():
            chosen_logps, rejected_logps = pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = loss_of(
            cfg, chosen_logps, rejected_logps,
            ref_chosen[rows].to(accelerator.device), ref_rejected[rows].to(accelerator.device),
            response_tokens(batch))
        objective = policy_objective(cfg.loss, losses, beta_prime=cfg.beta_prime)
        return objective, losses, (objective.detach(), chosen_rewards, rejected_rewards)

    for step in range(start_step, plan.steps):
        micro_rows, divisors = step_rows(run.schedule, step, cfg, train_idx, rank)
        step_losses, extras = trainer.step(step, micro_rows, compute, divisors)
        step_objectives = [e[0] for e in extras]
        step_chosen = [e[1] for e in extras]
        step_rejected = [e[2] for e in extras]
        done = step + 1
        logs = done % cfg.log_every == 0 or done == plan.steps
        evaluates = cfg.eval_every and done % cfg.eval_every == 0 and done != plan.steps
        saves = cfg.save_every and done % cfg.save_every == 0 and done != plan.steps
        if logs or evaluates or saves:
            watch.check(model if saves else None)  # before anything of these steps is logged or saved
        if logs:
            elapsed = time.perf_counter() - window_start
            tokens = int(accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device),
                                            reduction="sum"))
            last_train = train_record(done, step, plan, cfg, accelerator, step_losses, step_chosen,
                                      step_rejected, tokens / max(elapsed, 1e-9), step_objectives,
                                      epoch=run.schedule.epoch_of(done * cfg.grad_accum))
            log(last_train)
            window_tokens, window_start = 0, time.perf_counter()
        if evaluates:
            evaluate(done)
        if saves:
            save_checkpoint(accelerator, checkpoints, done, cfg, run_state)
        if on_progress and main:
            on_progress(1)

    watch.check(model)  # the last updates: no model with a NaN or inf weight is ever saved
    if not val_idx:  # no validation pass: a batch of training rows shows whether the log-probs are still finite
        probe = evaluate_rows(model, pairs, train_idx[rank::processes][:cfg.batch_size], ref_chosen, ref_rejected,
                              run, cfg, accelerator, plan.steps)
        if not math.isfinite(probe["margin"]):
            raise diverged("the margins", probe["margin"], plan.steps, plan, cfg, after=True)
    final_eval = evaluate(plan.steps)
    digests = gather_object([weights_digest(accelerator.unwrap_model(model))])
    save_final_model(accelerator, model, run.tokenizer, out / MODEL_DIR, cfg, run.config)
    summary = {
        "input": source, "output": str(out), "model": str(out / MODEL_DIR), "loss": cfg.loss, **eps_of(cfg),
        "loss_params": loss_params_of(cfg), "loss_level": loss_level(cfg),
        **{k: v for k, v in asdict(plan).items() if k != "memory_estimate_bytes"},
        "memory_estimate_bytes": plan.memory_estimate_bytes,
        "resumed_from_step": start_step if resume_from else None,
        "ref_cache": str(cache_path), "ref_cache_hit": ref_cache_hit,
        "weights_agree": len(set(digests)) == 1,  # every process ends with the same weights
        "train": last_train, "val": final_eval,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if main:
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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
        from accelerate.utils import gather_object

        gathered = gather_object(list(zip(indices, margins, strict=True)))
        indices, margins = [i for i, _ in gathered], [m for _, m in gathered]
    z = torch.tensor(margins, dtype=torch.float64)
    record = {"split": "val", "step": step, "rows": len(indices),
              "reward_accuracy": reward_accuracy(z), "margin": float(z.mean()), **eps_of(cfg)}
    if run.flipped is not None:
        sign = 1.0 - 2.0 * torch.tensor(run.flipped[indices], dtype=torch.float64)
        record["clean_reward_accuracy"] = reward_accuracy(z, sign)
    return record


def weights_digest(model: torch.nn.Module) -> str:
    """Hex digest of the trainable parameters (to check that data-parallel processes agree)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP: gathered
            digest.update(name.encode())
            digest.update(full.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# --- checkpoints and saving --------------------------------------------------------------------

def save_checkpoint(accelerator, checkpoints: Path, step: int, cfg: AlignConfig,
                    run_state: dict[str, Any] | None = None) -> Path:
    """Save model, optimizer and every process's RNG state at ``step``; keep only the newest.

    ``run_state`` (chat date, data and model fingerprints) goes into trainer.json beside the options.
    """
    return save_training_state(accelerator, checkpoints, step, {"config": asdict(cfg), **(run_state or {})})


def check_resumable(cfg: AlignConfig, saved: dict[str, Any], where: Path, *,
                    saved_run: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> None:
    """PrefnoiseError if an option that shapes training differs from the checkpoint's, or (given the
    checkpoint's ``saved_run`` and this run's ``run`` state) the model or the data do.

    A checkpoint written before data and model fingerprints were recorded is checked on options only.
    """
    changed = changed_options(saved, asdict(cfg), RESUME_FREE, LEGACY_OPTIONS)
    if changed:
        raise PrefnoiseError(f"--resume: {where} was written with different {', '.join(changed)}; "
                             "use the same options or drop --resume to start over")
    if saved_run is None or run is None:
        return
    if "model" in saved_run and saved_run["model"] != run["model"]:
        raise PrefnoiseError(f"--resume: the model differs from the checkpoint's "
                             f"({describe_model_change(saved_run['model'], run['model'])}); "
                             "use the same --model or start over with --overwrite")
    if "data" in saved_run and saved_run["data"] != run["data"]:
        raise PrefnoiseError(f"--resume: the data differs from the checkpoint's "
                             f"({describe_data_change(saved_run['data'], run['data'])}); "
                             "use the same data or start over with --overwrite")


def data_fingerprint(pairs: TokenizedPairs) -> dict[str, Any]:
    """What the run trains on, in order: the pair count, a digest of the pair_ids and one of the
    pairs' token ids (so a changed text or a flipped label shows, a reformatted file does not)."""
    ids = hashlib.blake2b(digest_size=16)
    for pair_id in pairs.pair_ids:
        ids.update(str(pair_id).encode() + b"\0")
    content = hashlib.blake2b(digest_size=16)
    for key in pairs.content_keys():
        content.update(key.encode())
    return {"pairs": len(pairs), "pair_ids": ids.hexdigest(), "tokens": content.hexdigest()}


def describe_data_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two ``data_fingerprint`` results, in words."""
    if saved.get("pairs") != now["pairs"]:
        return f"{now['pairs']} pairs now, {saved.get('pairs')} then"
    if saved.get("pair_ids") != now["pair_ids"]:
        return f"the same number of pairs ({now['pairs']}) but other pair_ids or another order"
    return "the same pair_ids, but the text or the labels of some pairs changed"


MODEL_HASH_LIMIT = 64 * 2**20  # model files up to this size (config, tokenizer) are hashed in full


def model_fingerprint(model_path: str | Path) -> dict[str, list[Any]]:
    """Per file of the --model directory: [size, mtime in ns, content hash or None].

    Files up to ``MODEL_HASH_LIMIT`` (config, tokenizer, small weights) are hashed; larger ones
    are known by size and mtime only. A link out of the directory is followed for its stats only.
    """
    root = Path(model_path)
    base = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    result: dict[str, list[Any]] = {}
    for file in files:
        st = file.stat()
        digest = None
        if st.st_size <= MODEL_HASH_LIMIT and file.resolve().is_relative_to(base):
            with open(file, "rb") as handle:
                digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        result[file.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, digest]
    return result


def describe_model_change(saved: dict[str, list[Any]], now: dict[str, list[Any]]) -> str:
    """The first file that differs between two ``model_fingerprint`` results, in words."""
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            return f"{name} is gone"
        if name not in saved:
            return f"{name} is new"
        (size0, mtime0, hash0), (size1, mtime1, hash1) = saved[name], now[name]
        if hash0 != hash1 or size0 != size1:
            return f"{name} has other content"
        if mtime0 != mtime1:
            return f"{name} was modified since"
    return "other files"


def assemble_reference(indexed_rows, n: int, schema) -> pl.DataFrame:
    """The reference frame in row order from (row index, row) pairs gathered over processes.

    Keyed by row index, not pair_id: rows that repeat a pair_id each keep their own values.
    """
    by_row = dict(indexed_rows)
    missing = [i for i in range(n) if i not in by_row]
    if missing:
        raise PrefnoiseError(f"the reference pass returned no log-probs for rows {missing[:5]}; "
                             "this is a bug, please report it")
    return pl.DataFrame([by_row[i] for i in range(n)], schema=schema, orient="row")


def save_final_model(accelerator, model, tokenizer, dest: Path, cfg: AlignConfig, config) -> None:
    """save_pretrained into ``dest`` atomically: merged weights, or only the adapter (--save-adapter)."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model) if not cfg.lora_r else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_path(dest, directory=True, command=ALIGN_COMMAND) as tmp:
            if cfg.lora_r and not cfg.save_adapter:
                unwrapped = unwrapped.merge_and_unload()
            restore_dropout(unwrapped, cfg.model)
            with quiet_transformers():
                unwrapped.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def restore_dropout(model, model_path: str) -> None:
    """Put the original dropout settings back in the config that gets saved."""
    from transformers import AutoConfig

    original = from_pretrained(AutoConfig, model_path, what="--model").to_dict()
    config = getattr(model, "config", None)
    if config is None or isinstance(config, dict):
        return
    for key, value in original.items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, value)
