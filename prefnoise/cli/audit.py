"""`prefnoise audit DATA`: estimate a dataset's flip rate and find the suspect pairs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
    progress,
    safe,
    show_progress,
)
from prefnoise.data import new_history_entry, write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import check_distinct_outputs, check_output_file


@app.command("audit")
@cli_errors
def audit_command(
    data: Annotated[
        str, typer.Argument(metavar="DATA", help="Preference table (Parquet, JSONL, CSV, saved dataset, or -).")
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", help="Write the table with fold, oof_margin and suspicion columns (- for stdout)."),
    ] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-fitting folds (split by pair_id hash).")] = 5,
    loss: Annotated[
        str, typer.Option("--loss", help="Margin loss of the fold models (a symmetric one is robust).")
    ] = "sigmoid",
    model: Annotated[
        str | None,
        typer.Option("--model", help="mlp (default with feature columns), embed+mlp, or a local HF model directory."),
    ] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="embed+mlp: local HF encoder directory.")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs per fold model (fit-reward's default).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Pairs per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP hidden width.")] = 256,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Token limit (text backends).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for ε̂'s interval.")] = 200,
    show_suspects: Annotated[
        int, typer.Option("--show-suspects", help="How many of the most suspect pairs to list.")
    ] = 10,
    show_text: Annotated[
        bool, typer.Option("--show-text", help="Include prompt and responses of the listed pairs.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Histogram of out-of-fold margins with the fitted mixture (PNG).")
    ] = None,
    fix: Annotated[str | None, typer.Option("--fix", help="With --out: 'drop' suspects or 'swap' them back.")] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="--fix acts on pairs with suspicion above this.")
    ] = 0.5,
    estimate_only: Annotated[
        bool, typer.Option("--estimate-only", help="Print only ε̂ (for align --noise-rate $(...)).")
    ] = False,
    overwrite: OverwriteOption = False,
    seed: SeedOption = C.DEFAULT_SEED,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
) -> None:
    """Cross-fit reward models, estimate the flip rate ε̂ and score each pair's suspicion."""
    from prefnoise import audit as A
    from prefnoise.cli.fit_reward import backend_of
    from prefnoise.reward import check_finite_features

    if fix is not None and out is None:
        raise PrefnoiseError("--fix needs --out for the cleaned table")
    if fix is not None and fix not in ("drop", "swap"):
        raise PrefnoiseError(f"--fix must be 'drop' or 'swap', got {fix!r}")
    started = time.time()  # the history entry's duration covers the folds, not only the writing
    check_output_file(out, inputs=[data], overwrite=overwrite)
    check_output_file(plot, inputs=[data], overwrite=overwrite, flag="--plot", suffix=".png")
    check_distinct_outputs({"--out": out, "--plot": plot})
    src = open_input(data, prompt_col, chosen_col, rejected_col, layout, drop_invalid)
    frame, _ = check_finite_features(src.collect(), src.name, drop_invalid)
    backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
    fit_options = {
        "loss": loss,
        "backend": backend,
        "model_path": model_path,
        "encoder_path": encoder,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "hidden": hidden,
        "max_length": max_length,
        "val_fraction": 0.0,
    }
    quiet = estimate_only or json_output
    with progress("cross-fitting folds", folds, enabled=show_progress(quiet)) as advance:
        scored = A.out_of_fold_margins(
            frame, folds=folds, seed=seed, fit_options=fit_options, device=device, on_fold=advance
        )
    estimate = A.estimate_noise_rate(scored[A.MARGIN].to_numpy(), n_boot=bootstrap, seed=seed)
    scored = A.add_suspicion(scored, estimate.mixture)
    fixed = 0
    if fix is not None:
        scored, fixed = A.clean_table(scored, mode=fix, threshold=threshold)
    if out is not None:
        parameters = {
            "folds": folds,
            **{k: v for k, v in fit_options.items() if v is not None},
            "fix": fix,
            "threshold": threshold,
        }
        entry = new_history_entry("audit", parameters, seed=seed, source=src)
        entry.started = started
        entry.extra["noise_estimate"] = {"rate": estimate.rate, "low": estimate.low, "high": estimate.high}
        if fix is not None:
            entry.extra["fixed_pairs"] = {"mode": fix, "count": fixed}
        write_table(scored, out, entry=entry, overwrite=overwrite)
    if plot is not None:
        from prefnoise.experiments.figures import margin_histogram

        margin_histogram(scored[A.MARGIN].to_numpy(), estimate.mixture, plot)
    if estimate_only:
        typer.echo(f"{estimate.rate:.4f}")
        return
    report = {
        "input": src.name,
        "pairs": frame.height,
        "folds": folds,
        "loss": loss,
        "backend": backend,
        "noise_rate": estimate.to_dict(),
        "suspects_above_threshold": int((scored[A.SUSPICION] > threshold).sum()) if fix is None else 0,
        "threshold": threshold,
        "fixed": {"mode": fix, "count": fixed} if fix else None,
        "most_suspect": A.most_suspect(scored, show_suspects, with_text=show_text),
    }
    if C.FLIPPED in scored.columns and fix is None and scored[C.FLIPPED].n_unique() == 2:
        flipped = scored[C.FLIPPED].to_numpy()
        report["against_flipped"] = {
            "true_rate": float(flipped.mean()),
            "auroc": A.auroc(scored[A.SUSPICION].to_numpy(), flipped),
            "precision_at_true_count": A.precision_at(scored[A.SUSPICION].to_numpy(), flipped, int(flipped.sum())),
        }
    if json_output:
        emit_json(report, to_stderr=out == "-")
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    rate = report["noise_rate"]
    interval = f" (95% interval {rate['low']:.3f}–{rate['high']:.3f})" if rate["low"] is not None else ""
    console.print(
        f"audit: {report['pairs']:,} pairs, {report['folds']} folds, {report['backend']} with {report['loss']} loss"
    )
    console.print(f"estimated flip rate ε̂ = {rate['rate']:.3f}{interval}")
    if "against_flipped" in report:
        known = report["against_flipped"]
        console.print(
            f"against the `flipped` column: true rate {known['true_rate']:.3f}, AUROC {known['auroc']:.3f}, "
            f"precision at the true count {known['precision_at_true_count']:.3f}"
        )
    if report["fixed"]:
        console.print(
            f"--fix {report['fixed']['mode']}: {report['fixed']['count']:,} pairs above {report['threshold']}"
        )
    else:
        console.print(f"{report['suspects_above_threshold']:,} pairs have suspicion above {report['threshold']}")
    if report["most_suspect"]:
        table = Table(title="most suspect pairs", title_justify="left")
        for column in report["most_suspect"][0]:
            table.add_column(column, justify="right" if column in ("oof_margin", "suspicion") else "left")
        for row in report["most_suspect"]:
            table.add_row(*[f"{v:.4f}" if isinstance(v, float) else safe(v) for v in row.values()])
        console.print(table)
