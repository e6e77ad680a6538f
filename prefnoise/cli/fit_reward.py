"""`prefnoise fit-reward DATA --loss NAME --out DIR`: train a reward model on preference pairs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prefnoise import columns as C
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    DropInvalidOption,
    JsonOption,
    LayoutOption,
    OverwriteOption,
    PromptColOption,
    RejectedColOption,
    SeedOption,
    cli_errors,
    console,
    emit_json,
    open_input,
    show_progress,
)
from prefnoise.data import new_history_entry
from prefnoise.errors import PrefnoiseError
from prefnoise.loss_names import MARGIN_LOSS_NAMES, MARGIN_RATE_PARAMS, missing_rate
from prefnoise.outputs import check_output_dir


def backend_of(model: str | None, has_features: bool) -> tuple[str, str | None]:
    """(backend, model path) for the --model value: mlp, embed+mlp, or a local HF model directory."""
    if model is None:
        if not has_features:
            raise PrefnoiseError(
                "the table has no chosen_features/rejected_features, so there is no default model; "
                "pass --model PATH (a local HF model) or --model embed+mlp --encoder PATH"
            )
        return "mlp", None
    if model in ("mlp", "embed+mlp"):
        return model, None
    if not Path(model).is_dir():
        raise PrefnoiseError(f"--model {model}: not 'mlp', 'embed+mlp' or a local model directory")
    return "transformer", model


@contextlib.contextmanager
def training_progress(enabled: bool) -> Iterator[dict[str, Callable]]:
    """Callbacks on_start/on_progress/on_epoch drawing a bar with loss and validation accuracy."""
    if not enabled:
        yield {}
        return
    bar = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pairs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task("training", total=None, status="")

        def on_epoch(row: dict[str, Any]) -> None:
            status = f"epoch {row['epoch']}  loss {row['train_loss']:.4f}"
            if "val_accuracy" in row:
                status += f"  val acc {row['val_accuracy']:.3f}"
            if "val_clean_accuracy" in row:
                status += f"  clean {row['val_clean_accuracy']:.3f}"
            bar.update(task, status=status)

        yield {
            "on_start": lambda total: bar.update(task, total=total),
            "on_progress": lambda n: bar.advance(task, n),
            "on_epoch": on_epoch,
        }


@app.command("fit-reward")
@cli_errors
def fit_reward_command(
    data: Annotated[
        str, typer.Argument(metavar="DATA", help="Preference table (Parquet, JSONL, CSV, saved dataset, or -).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output directory for the model: new or empty (or an earlier output, with --overwrite)."
        ),
    ],
    loss: Annotated[str, typer.Option("--loss", help=f"Margin loss: {', '.join(MARGIN_LOSS_NAMES)}.")] = "sigmoid",
    model: Annotated[
        str | None,
        typer.Option("--model", help="mlp (default with feature columns), embed+mlp, or a local HF model directory."),
    ] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="embed+mlp: local HF encoder directory.")] = None,
    margin_scale: Annotated[
        float, typer.Option("--margin-scale", help="β: the loss sees β·(r_chosen − r_rejected).")
    ] = 1.0,
    eps: Annotated[
        float | None, typer.Option("--eps", help="cdpo/rdpo (required): label smoothing / known flip rate.")
    ] = None,
    tau: Annotated[
        float | None, typer.Option("--tau", help="ipo: target margin 1/(2τ) of the reward margin (default 0.5).")
    ] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="ropo: α (default 14).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default: mlp 50, transformer 1).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Pairs per step (default: mlp 512, transformer 8).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="AdamW learning rate (default: mlp 1e-3, transformer 2e-5).")
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Validation share, split by pair_id hash.")
    ] = 0.1,
    early_stopping: Annotated[
        int | None,
        typer.Option(
            "--early-stopping",
            metavar="PATIENCE",
            help="Stop after PATIENCE epochs without a lower validation loss; keep the best.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Token limit for prompt+response (text backends).")
    ] = None,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP hidden width.")] = 256,
    layers: Annotated[int, typer.Option("--layers", help="MLP hidden layers.")] = 2,
    dropout: Annotated[float, typer.Option("--dropout", help="MLP dropout.")] = 0.0,
    output_clip: Annotated[
        float, typer.Option("--output-clip", help="Rewards of every backend are clipped to [−C, C] (0 disables).")
    ] = 20.0,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="embed+mlp embedding cache (default $PREFNOISE_CACHE_DIR or ~/.cache/prefnoise)."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
    seed: SeedOption = C.DEFAULT_SEED,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
) -> None:
    """Train a reward model r(prompt, response) with a margin loss; print validation accuracy vs clean labels last."""
    from prefnoise.reward import fit_reward_model, save_reward_model
    from prefnoise.reward.models import describe_truncation

    if loss not in MARGIN_LOSS_NAMES:
        raise PrefnoiseError(f"unknown --loss {loss!r}; choose one of: {', '.join(MARGIN_LOSS_NAMES)}")
    missing = missing_rate(loss, {"eps": eps}, MARGIN_RATE_PARAMS)
    if missing:
        raise PrefnoiseError(missing)
    if encoder is not None and model != "embed+mlp":
        raise PrefnoiseError("--encoder applies to --model embed+mlp only")
    check_output_dir(out, command="fit-reward", inputs=[data, model, encoder, cache_dir], overwrite=overwrite)
    src = open_input(data, prompt_col, chosen_col, rejected_col, layout, drop_invalid)
    frame = src.collect()
    backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
    loss_params = {"eps": eps, "tau": tau, "alpha": alpha}
    options = {
        "loss": loss,
        "backend": backend,
        "model_path": model_path,
        "encoder_path": encoder,
        "loss_params": loss_params,
        "margin_scale": margin_scale,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "val_fraction": val_fraction,
        "early_stopping": early_stopping,
        "device": device,
        "max_length": max_length,
        "hidden": hidden,
        "layers": layers,
        "dropout": dropout,
        "output_clip": output_clip if output_clip > 0 else None,
        "cache_dir": cache_dir,
    }
    entry = new_history_entry(
        "fit-reward", {k: v for k, v in options.items() if k != "cache_dir"}, seed=seed, source=src
    )
    with training_progress(show_progress(json_output)) as callbacks:
        result = fit_reward_model(frame, seed=seed, drop_invalid=drop_invalid, source=src.name, **options, **callbacks)
    if not result.is_main:  # other data-parallel processes: the main one writes
        return
    save_reward_model(result, out, history=[*src.history, entry.to_dict(rows_out=frame.height)])
    final = result.metrics["final"]
    if json_output:
        emit_json({"out": str(out), "rows": frame.height, **{k: v for k, v in result.metrics.items() if k != "epochs"}})
        return
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
