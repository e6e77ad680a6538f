"""`prefnoise fit-reward DATA --loss NAME --out DIR`: train a reward model on preference pairs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    DeviceOption,
    DropInvalidOption,
    EncoderOption,
    HiddenOption,
    JsonOption,
    LayoutOption,
    OverwriteOption,
    PairsArgument,
    PromptColOption,
    RejectedColOption,
    RejectedScoreColOption,
    RewardModelOption,
    SeedOption,
    SplitOption,
    cli_errors,
    console,
    emit_json,
    input_options,
    log_console,
    options_from,
    register_options,
    show_progress,
)
from prefnoise.loss_names import MARGIN_LOSS_NAMES
from prefnoise.options.fit_reward import FitRewardConfig


@contextlib.contextmanager
def training_progress(enabled: bool) -> Iterator[dict[str, Callable]]:
    """Callbacks drawing progress bars on stderr: embedding (embed+mlp's encoder, cache misses only)
    and training (with loss and validation accuracy), each with its total, elapsed time and ETA."""
    if not enabled:
        yield {}
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=log_console,
        transient=True,
    )
    with bar:
        tasks: dict[str, Any] = {}

        def task(name: str, unit: str) -> Any:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=None, status="", unit=unit)
            return tasks[name]

        def on_epoch(row: dict[str, Any]) -> None:
            status = f"epoch {row['epoch']}  loss {row['train_loss']:.4f}"
            if "val_accuracy" in row:
                status += f"  val acc {row['val_accuracy']:.3f}"
            if "val_clean_accuracy" in row:
                status += f"  clean {row['val_clean_accuracy']:.3f}"
            bar.update(task("training", "pairs"), status=status)

        def on_embed_start(total: int) -> None:
            if total:
                bar.update(task("embedding", "texts"), total=total)

        yield {
            "on_start": lambda total: bar.update(task("training", "pairs"), total=total),
            "on_progress": lambda n: bar.advance(task("training", "pairs"), n),
            "on_epoch": on_epoch,
            "on_embed_start": on_embed_start,
            "on_embed": lambda n: bar.advance(task("embedding", "texts"), n),
        }


ModelDirOption = Annotated[
    Path,
    typer.Option(
        "--out", help="Output directory for the model: new or empty (or an earlier output, with --overwrite)."
    ),
]
LossOption = Annotated[str, typer.Option("--loss", help=f"Margin loss: {', '.join(MARGIN_LOSS_NAMES)}.")]
EmbedFeaturesOption = Annotated[
    str | None,
    typer.Option(
        "--embed-features",
        help="embed+mlp: comma-separated parts the MLP reads: joint-mean (default), joint-cls, "
        "response-mean, response-cls, length (joint = prompt and response together).",
    ),
]
HeadOption = Annotated[
    str | None,
    typer.Option(
        "--head",
        help="transformer: sequence-classification (the model's own head on its first/last token) or "
        "pooled (a linear head on mean-pooled states); default: by architecture.",
    ),
]
ScheduleOption = Annotated[
    str | None,
    typer.Option("--schedule", help="Learning rate after warmup: constant, linear or cosine decay "
                 "(default: transformer linear, else constant)."),
]
WarmupOption = Annotated[
    float | None,
    typer.Option("--warmup", help="Share of the steps with linear lr warmup (default: transformer 0.1, else 0)."),
]
MarginScaleOption = Annotated[float, typer.Option("--margin-scale", help="β: the loss sees β·(r_chosen − r_rejected).")]
EpsOption = Annotated[
    float | None, typer.Option("--eps", help="cdpo/rdpo (required): label smoothing / known flip rate.")
]
TauOption = Annotated[
    float | None, typer.Option("--tau", help="ipo: target margin 1/(2τ) of the reward margin (default 0.5).")
]
AlphaOption = Annotated[float | None, typer.Option("--alpha", help="ropo: α (default 14).")]
EpochsOption = Annotated[int | None, typer.Option("--epochs", help="Epochs (default: mlp 50, transformer 1).")]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="Pairs per step (default: mlp 512, transformer 8).")
]
LrOption = Annotated[
    float | None, typer.Option("--lr", help="AdamW learning rate (default: mlp 1e-3, transformer 2e-5).")
]
WeightDecayOption = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
ValFractionOption = Annotated[float, typer.Option("--val-fraction", help="Validation share, split by pair_id hash.")]
EarlyStoppingOption = Annotated[
    int | None,
    typer.Option(
        "--early-stopping",
        metavar="PATIENCE",
        help="Stop after PATIENCE epochs without a lower validation loss; keep the best.",
    ),
]
MaxLengthOption = Annotated[
    int | None, typer.Option("--max-length", help="Token limit for prompt+response (text backends).")
]
LayersOption = Annotated[int, typer.Option("--layers", help="MLP hidden layers.")]
DropoutOption = Annotated[float, typer.Option("--dropout", help="MLP dropout.")]
OutputClipOption = Annotated[
    float, typer.Option("--output-clip", help="Rewards of every backend are clipped to [−C, C] (0 disables).")
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="embed+mlp embedding cache (default $PREFNOISE_CACHE_DIR or ~/.cache/prefnoise)."),
]
GradAccumOption = Annotated[int, typer.Option("--grad-accum", help="Micro-batches of --batch-size per optimizer step.")]
MaxGradNormOption = Annotated[
    float | None,
    typer.Option("--max-grad-norm", help="Clip gradients to this norm; 0: off (default: transformer 1.0, else 0)."),
]
PrecisionOption = Annotated[
    str, typer.Option("--precision", help="auto (bf16 autocast on a GPU that has it), fp32 or bf16.")
]
LoraROption = Annotated[
    int, typer.Option("--lora-r", help="transformer: train LoRA adapters of this rank (0: every weight).")
]
LoraAlphaOption = Annotated[float, typer.Option("--lora-alpha", help="LoRA α.")]
LoraDropoutOption = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")]
LogEveryOption = Annotated[
    int, typer.Option("--log-every", help="Write a train record to OUT/metrics.jsonl every N steps.")
]
SaveEveryOption = Annotated[
    int, typer.Option("--save-every", help="Checkpoint into OUT/checkpoints every N optimizer steps (0: never).")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out (same options and data).")
]
ReportToOption = Annotated[
    str, typer.Option("--report-to", help="Trackers for the metrics: none, tensorboard, trackio or wandb (OUT/runs).")
]


register_options("fit-reward", FitRewardConfig)


@app.command("fit-reward")
@cli_errors
def fit_reward_command(
    data: PairsArgument,
    out: ModelDirOption,
    loss: LossOption = FitRewardConfig.loss,
    model: RewardModelOption = FitRewardConfig.model,
    encoder: EncoderOption = FitRewardConfig.encoder,
    embed_features: EmbedFeaturesOption = FitRewardConfig.embed_features,
    head: HeadOption = FitRewardConfig.head,
    schedule: ScheduleOption = FitRewardConfig.schedule,
    warmup: WarmupOption = FitRewardConfig.warmup,
    margin_scale: MarginScaleOption = FitRewardConfig.margin_scale,
    eps: EpsOption = FitRewardConfig.eps,
    tau: TauOption = FitRewardConfig.tau,
    alpha: AlphaOption = FitRewardConfig.alpha,
    epochs: EpochsOption = FitRewardConfig.epochs,
    batch_size: BatchSizeOption = FitRewardConfig.batch_size,
    lr: LrOption = FitRewardConfig.lr,
    weight_decay: WeightDecayOption = FitRewardConfig.weight_decay,
    val_fraction: ValFractionOption = FitRewardConfig.val_fraction,
    early_stopping: EarlyStoppingOption = FitRewardConfig.early_stopping,
    device: DeviceOption = FitRewardConfig.device,
    max_length: MaxLengthOption = FitRewardConfig.max_length,
    hidden: HiddenOption = FitRewardConfig.hidden,
    layers: LayersOption = FitRewardConfig.layers,
    dropout: DropoutOption = FitRewardConfig.dropout,
    output_clip: OutputClipOption = FitRewardConfig.output_clip,
    cache_dir: CacheDirOption = FitRewardConfig.cache_dir,
    grad_accum: GradAccumOption = FitRewardConfig.grad_accum,
    max_grad_norm: MaxGradNormOption = FitRewardConfig.max_grad_norm,
    precision: PrecisionOption = FitRewardConfig.precision,
    lora_r: LoraROption = FitRewardConfig.lora_r,
    lora_alpha: LoraAlphaOption = FitRewardConfig.lora_alpha,
    lora_dropout: LoraDropoutOption = FitRewardConfig.lora_dropout,
    log_every: LogEveryOption = FitRewardConfig.log_every,
    save_every: SaveEveryOption = FitRewardConfig.save_every,
    resume: ResumeOption = FitRewardConfig.resume,
    report_to: ReportToOption = FitRewardConfig.report_to,
    overwrite: OverwriteOption = False,
    seed: SeedOption = FitRewardConfig.seed,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = FitRewardConfig.drop_invalid,
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
) -> None:
    """Train a reward model r(prompt, response) with a margin loss; print validation accuracy vs clean labels last."""
    from prefnoise import api  # the API imports polars and more: not for --help

    options, inputs = options_from(FitRewardConfig, locals()), input_options(locals())
    with training_progress(show_progress(json_output)) as callbacks:
        fitted = api.fit_reward(data, out, options=options, overwrite=overwrite, **inputs, **callbacks)
    if not fitted.fit.is_main:  # other data-parallel processes: the main one writes
        return
    if json_output:
        emit_json(fitted.summary)
    else:
        _print_summary(fitted.fit, fitted.model.backend, loss, out)


def _print_summary(result: Any, backend: str, loss: str, out: Path) -> None:
    """The run in two lines (backend, loss, pairs, epochs; losses and validation accuracy), the truncation
    note, and the validation accuracy against clean labels last."""
    from prefnoise.reward.tokens import describe_truncation  # heavy: torch

    final = result.metrics["final"]
    console.print(
        f"fit-reward: {backend} · loss {loss}"
        + "".join(f" · {'ε' if k == 'eps' else k} {v}" for k, v in result.metrics["loss_params"].items())
        + f" · {result.metrics['train_pairs']:,} train / "
        f"{result.metrics['val_pairs']:,} val pairs · {result.metrics['stopped_epoch']} epochs "
        f"on {result.metrics['device']} → {out}"
    )
    console.print(
        f"train loss {final['train_loss']:.4f}"
        + (
            f" · val loss {final['val_loss']:.4f} · val accuracy (given labels) {final['val_accuracy']:.4f}"
            if "val_loss" in final
            else " · no validation split"
        )
    )
    cut = describe_truncation(getattr(result.model, "truncation", []), result.model.config.get("max_length") or 0)
    if cut:
        console.print(cut)
    if "val_clean_accuracy" in final:
        console.print(f"[bold]val accuracy vs clean labels: {final['val_clean_accuracy']:.4f}[/bold]")
