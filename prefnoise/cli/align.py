"""`prefnoise align DATA --model PATH --out DIR`: SymPO / DPO-family fine-tuning of a causal LM.

Data-parallel on several GPUs (or CPU processes): ``accelerate launch -m prefnoise align ...``.
"""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.table import Table

from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    DropInvalidOption,
    JsonOption,
    LayoutOption,
    OverwriteOption,
    PromptColOption,
    RejectedColOption,
    RejectedScoreColOption,
    SeedOption,
    SplitOption,
    cli_errors,
    console,
    emit_json,
    input_options,
    options_from,
    progress,
    register_options,
    show_progress,
)
from prefnoise.loss_names import POLICY_LOSS_NAMES as POLICY_LOSSES
from prefnoise.options.align import DEVICES, AlignConfig
from prefnoise.options.training import SCHEDULES

LOSS = "Loss"
TRAIN = "Training"
OUTPUT = "Output"


DataArgument = Annotated[str, typer.Argument(metavar="DATA", help="Preference table (any readable format, or -).")]
ModelOption = Annotated[str, typer.Option("--model", help="Local causal LM directory (save_pretrained).")]
OutOption = Annotated[str | None, typer.Option("--out", help="Output directory (required unless --dry-run).")]
# the Loss panel
LossOption = Annotated[str, typer.Option("--loss", help=f"{', '.join(POLICY_LOSSES)}.", rich_help_panel=LOSS)]
SymmetricLossOption = Annotated[
    str, typer.Option("--symmetric-loss", help="sympo's loss on the margin: sigmoid or ramp.", rich_help_panel=LOSS)
]
BetaOption = Annotated[float, typer.Option("--beta", help="β of the implicit reward.", rich_help_panel=LOSS)]
ClipOption = Annotated[
    float, typer.Option("--clip", help="sympo: clip each implicit reward to [−c, c]; 0 turns it off.",
                        rich_help_panel=LOSS)
]
LabelSmoothingOption = Annotated[
    float | None, typer.Option("--label-smoothing", help="cdpo (required): ε in [0, 0.5).", rich_help_panel=LOSS)
]
NoiseRateOption = Annotated[
    float | None, typer.Option("--noise-rate", help="rdpo (required): the flip rate ε in [0, 0.5).",
                               rich_help_panel=LOSS)
]
NoiseRateFromOption = Annotated[
    str | None, typer.Option("--noise-rate-from", metavar="AUDIT.json", help="cdpo/rdpo: ε from an audit's "
                             "--json file (its estimate and interval go into the run's summary).", rich_help_panel=LOSS)
]
TauOption = Annotated[
    float | None, typer.Option("--tau", help="ipo: target 1/(2τ) of the per-token averaged log-ratio margin "
                               "(default β).", rich_help_panel=LOSS)
]
AlphaOption = Annotated[float, typer.Option("--alpha", help="ropo: α.", rich_help_panel=LOSS)]
BetaPrimeOption = Annotated[
    float, typer.Option("--beta-prime", help="drdpo: β′ of −β′·log mean exp(−ℓ/β′) over the batch.",
                        rich_help_panel=LOSS)
]
# the Training panel
LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=TRAIN)]
WeightDecayOption = Annotated[float, typer.Option("--weight-decay", rich_help_panel=TRAIN)]
WarmupStepsOption = Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.", rich_help_panel=TRAIN)]
ScheduleOption = Annotated[
    str, typer.Option("--schedule", help=f"Decay after warmup: {', '.join(SCHEDULES)}.", rich_help_panel=TRAIN)
]
MaxGradNormOption = Annotated[
    float, typer.Option("--max-grad-norm", help="Clip the gradient norm; 0 turns it off.", rich_help_panel=TRAIN)
]
BatchSizeOption = Annotated[
    int, typer.Option("--batch-size", help="Pairs per micro-batch per process.", rich_help_panel=TRAIN)
]
GradAccumOption = Annotated[
    int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.", rich_help_panel=TRAIN)
]
BatchingOption = Annotated[
    str, typer.Option("--batching", help="group: batch pairs of similar length (less padding, faster); exact: "
                      "the plain shuffled order (for loss-parity checks).", rich_help_panel=TRAIN)
]
MaxTokensPerBatchOption = Annotated[
    int | None, typer.Option("--max-tokens-per-batch", help="group: fill each micro-batch up to N padded tokens "
                             "(2 x pairs x longest pair) instead of --batch-size pairs.", rich_help_panel=TRAIN)
]
EpochsOption = Annotated[int, typer.Option("--epochs", rich_help_panel=TRAIN)]
MaxStepsOption = Annotated[
    int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).", rich_help_panel=TRAIN)
]
MaxLengthOption = Annotated[
    int, typer.Option("--max-length", help="Prompt + response tokens at most.", rich_help_panel=TRAIN)
]
MaxPromptLengthOption = Annotated[
    int | None,
    typer.Option("--max-prompt-length", help="Prompt tokens kept (from the right) when a pair is too long "
                 "(default 256, or half of a shorter --max-length).", rich_help_panel=TRAIN),
]
LoraROption = Annotated[
    int, typer.Option("--lora-r", help="LoRA rank (peft); 0 trains all weights.", rich_help_panel=TRAIN)
]
LoraAlphaOption = Annotated[float, typer.Option("--lora-alpha", rich_help_panel=TRAIN)]
LoraDropoutOption = Annotated[float, typer.Option("--lora-dropout", rich_help_panel=TRAIN)]
PrecisionOption = Annotated[
    str, typer.Option("--precision", help="auto (bf16 autocast on GPU), fp32 or bf16.", rich_help_panel=TRAIN)
]
GradientCheckpointingOption = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Trade compute for activation memory.",
                       rich_help_panel=TRAIN)
]
DeviceOption = Annotated[str, typer.Option("--device", help=f"{', '.join(DEVICES)}.", rich_help_panel=TRAIN)]
ValFractionOption = Annotated[
    float, typer.Option("--val-fraction", help="Held-out share, split stably by pair_id.", rich_help_panel=TRAIN)
]
EvalEveryOption = Annotated[
    int, typer.Option("--eval-every", help="Evaluate every N steps (0: before and after training).",
                      rich_help_panel=TRAIN)
]
# the Output panel
LogEveryOption = Annotated[
    int, typer.Option("--log-every", help="Write a metrics line every N steps.", rich_help_panel=OUTPUT)
]
SaveEveryOption = Annotated[
    int, typer.Option("--save-every", help="Checkpoint every N steps (0: never).", rich_help_panel=OUTPUT)
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.", rich_help_panel=OUTPUT)
]
ReportToOption = Annotated[
    str, typer.Option("--report-to", help="Trackers for the metrics: none, tensorboard, trackio or wandb "
                      "(logs in OUT/runs).", rich_help_panel=OUTPUT)
]
SaveAdapterOption = Annotated[
    bool, typer.Option("--save-adapter", help="Save only the LoRA adapter, not merged weights.",
                       rich_help_panel=OUTPUT)
]
RefCacheOption = Annotated[
    str | None, typer.Option("--ref-cache", help="Reference log-prob cache (default DIR/ref_logps.parquet).",
                             rich_help_panel=OUTPUT)
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (rows, tokens, steps, memory) and stop.",
                       rich_help_panel=OUTPUT)
]


register_options("align", AlignConfig)


@app.command("align")
@cli_errors
def align_command(
    source: DataArgument,
    model: ModelOption,
    out: OutOption = None,
    loss: LossOption = AlignConfig.loss,
    symmetric_loss: SymmetricLossOption = AlignConfig.symmetric_loss,
    beta: BetaOption = AlignConfig.beta,
    clip: ClipOption = AlignConfig.clip,
    label_smoothing: LabelSmoothingOption = AlignConfig.label_smoothing,
    noise_rate: NoiseRateOption = AlignConfig.noise_rate,
    noise_rate_from: NoiseRateFromOption = AlignConfig.noise_rate_from,
    tau: TauOption = AlignConfig.tau,
    alpha: AlphaOption = AlignConfig.alpha,
    beta_prime: BetaPrimeOption = AlignConfig.beta_prime,
    lr: LrOption = AlignConfig.lr,
    weight_decay: WeightDecayOption = AlignConfig.weight_decay,
    warmup_steps: WarmupStepsOption = AlignConfig.warmup_steps,
    schedule: ScheduleOption = AlignConfig.schedule,
    max_grad_norm: MaxGradNormOption = AlignConfig.max_grad_norm,
    batch_size: BatchSizeOption = AlignConfig.batch_size,
    grad_accum: GradAccumOption = AlignConfig.grad_accum,
    batching: BatchingOption = AlignConfig.batching,
    max_tokens_per_batch: MaxTokensPerBatchOption = AlignConfig.max_tokens_per_batch,
    epochs: EpochsOption = AlignConfig.epochs,
    max_steps: MaxStepsOption = AlignConfig.max_steps,
    max_length: MaxLengthOption = AlignConfig.max_length,
    max_prompt_length: MaxPromptLengthOption = AlignConfig.max_prompt_length,
    lora_r: LoraROption = AlignConfig.lora_r,
    lora_alpha: LoraAlphaOption = AlignConfig.lora_alpha,
    lora_dropout: LoraDropoutOption = AlignConfig.lora_dropout,
    precision: PrecisionOption = AlignConfig.precision,
    gradient_checkpointing: GradientCheckpointingOption = AlignConfig.gradient_checkpointing,
    device: DeviceOption = AlignConfig.device,
    val_fraction: ValFractionOption = AlignConfig.val_fraction,
    eval_every: EvalEveryOption = AlignConfig.eval_every,
    seed: SeedOption = AlignConfig.seed,
    log_every: LogEveryOption = AlignConfig.log_every,
    save_every: SaveEveryOption = AlignConfig.save_every,
    resume: ResumeOption = AlignConfig.resume,
    report_to: ReportToOption = AlignConfig.report_to,
    overwrite: OverwriteOption = False,
    save_adapter: SaveAdapterOption = AlignConfig.save_adapter,
    ref_cache: RefCacheOption = AlignConfig.ref_cache,
    dry_run: DryRunOption = False,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
) -> None:
    """Fine-tune a causal LM on preference pairs with SymPO (default) or a DPO-family loss."""
    from prefnoise import api  # the API imports polars and more: not for --help
    from prefnoise.api.aligning import is_main_process  # the API imports polars and more: not for --help

    result = api.align(
        source, model=model, out=out, options=options_from(AlignConfig, {**locals(), "out": out or ""}),
        dry_run=dry_run, overwrite=overwrite, **input_options(locals()),
        progress_bar=functools.partial(progress, enabled=show_progress(json_output)),
    )
    if dry_run or is_main_process():  # other data-parallel processes print nothing
        _print_result(result.summary, dry_run=dry_run, json_output=json_output)


def _print_result(summary: dict, *, dry_run: bool, json_output: bool) -> None:
    """The --json object, the dry run's plan, or the training summary."""
    if json_output:
        emit_json(summary)
    elif dry_run:
        _print_plan({k: v for k, v in summary.items() if k not in ("dry_run", "input")})
    else:
        _print_summary(summary)


def _print_plan(plan: dict) -> None:
    table = Table(title="align plan (dry run)", title_justify="left", show_header=False)
    for key, value in plan.items():
        if key == "memory_estimate_bytes":
            key, value = "memory estimate", f"{value / 2**30:.2f} GiB (weights, optimizer, activations; rough)"
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) and value is not True
                      and value is not False else str(value))
    console.print(table)


def _print_summary(summary: dict) -> None:
    params = ", ".join(f"{'ε' if k == 'eps' else k} = {v}" for k, v in summary.get("loss_params", {}).items())
    table = Table(title=f"align: {summary['loss']} ({params})", title_justify="left")
    for header in ("split", "step", "reward acc", "clean acc", "margin", "loss"):
        table.add_column(header, justify="left" if header == "split" else "right")
    for record in (summary["train"], summary["val"]):
        if record:
            table.add_row(
                record["split"], str(record["step"]), f"{record['reward_accuracy']:.3f}",
                f"{record['clean_reward_accuracy']:.3f}" if "clean_reward_accuracy" in record else "",
                f"{record['margin']:.4f}", f"{record['loss']:.4f}" if "loss" in record else "",
            )
    console.print(table)
    if summary.get("loss_level") == "batch":
        console.print(f"{summary['loss']} is batch-level: train loss is −β′·log mean exp(−ℓ/β′) over each "
                      "micro-batch (no per-row loss); dpo_row_loss in metrics.jsonl is the mean per-row DPO ℓ")
    cache = "reused" if summary["ref_cache_hit"] else "computed"
    console.print(
        f"{summary['rows']:,} pairs ({summary['train_rows']:,} train, {summary['val_rows']:,} val, "
        f"{summary['truncated_rows']:,} truncated), {summary['steps']:,} steps, reference log-probs {cache}; "
        f"model → {summary['model']} in {summary['seconds']:.1f} s"
    )
