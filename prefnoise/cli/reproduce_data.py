"""`prefnoise reproduce DATA`: which loss survives the noise on your own pairs, with your model."""

from __future__ import annotations

import functools
import inspect
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from rich.table import Table
from typer.core import TyperGroup

from prefnoise.api.comparing import compare_losses
from prefnoise.cli.common import (
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
from prefnoise.cli.fit_reward import fit_reward_command
from prefnoise.experiments.loss_comparison import headline
from prefnoise.options import ComparisonOptions

DATA_COMMAND = "data"
# fit-reward options that make no sense per cell of a grid (the grid names its own output, loss and seed)
NOT_PER_CELL = ("data", "out", "loss", "seed", "json_output", "overwrite", "resume", "save_every", "report_to",
                "log_every")


class DataDefaultGroup(TyperGroup):
    """A command group whose first argument, when it names no subcommand, is DATA for the `data` subcommand:
    `prefnoise reproduce pairs.parquet --out d` runs `prefnoise reproduce data pairs.parquet --out d`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [DATA_COMMAND, *args]
        return super().parse_args(ctx, args)


LossesOption = Annotated[str, typer.Option("--losses", help="Losses to compare, comma-separated (the loss table).")]
RatesOption = Annotated[str, typer.Option("--rates", help="Injected noise rates, comma-separated, each in [0, 0.5).")]
ReferenceOption = Annotated[str, typer.Option("--reference", help="The loss every other is compared to, paired.")]
SeedsOption = Annotated[int, typer.Option("--seeds", help="Seeds: each a split, a set of flips and an initialisation.")]
NoiseOption = Annotated[str, typer.Option("--noise", help="symmetric; asymmetric (a rate flips the pairs --by marks, "
                                          "--rate-neg the others); uniform (a rate is the per-pair maximum).")]
ByOption = Annotated[str, typer.Option("--by", help="asymmetric: which pairs a rate flips (as corrupt --by).")]
RateNegOption = Annotated[float, typer.Option("--rate-neg", help="asymmetric: the flip rate of the other pairs.")]
TestFractionOption = Annotated[float, typer.Option("--test-fraction", help="Share of prompts held out for testing.")]
SplitByOption = Annotated[str, typer.Option("--split-by", help="prompt (disjoint prompts) or pair.")]
BootstrapOption = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the intervals.")]
SeedOption = Annotated[int, typer.Option("--seed", help="The first seed (the seeds are seed, seed+1, ...).")]
DataArgument = Annotated[str, typer.Argument(help="The pairs table (any input prefnoise reads).", show_default=False)]
OutOption = Annotated[Path, typer.Option("--out", help="Directory for results.parquet, results.md, summary.json "
                                         "and robustness.png.")]
GRID = ComparisonOptions  # the defaults, defined once there


def data_command(
    data: DataArgument,
    out: OutOption,
    losses: LossesOption = ",".join(GRID.losses),
    rates: RatesOption = ",".join(f"{rate:g}" for rate in GRID.rates),
    reference: ReferenceOption = GRID.reference,
    seeds: SeedsOption = GRID.seeds,
    noise: NoiseOption = GRID.noise,
    by: ByOption = GRID.by,
    rate_neg: RateNegOption = GRID.rate_neg,
    test_fraction: TestFractionOption = GRID.test_fraction,
    split_by: SplitByOption = GRID.split_by,
    bootstrap: BootstrapOption = GRID.bootstrap,
    seed: SeedOption = GRID.seed,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    **fit_options: Any,
) -> None:
    """Which loss survives your noise: split DATA by prompt, flip the training part, fit every loss on the same
    flips with any fit-reward option, and compare them on the untouched test part with paired intervals."""
    options = options_from(ComparisonOptions, locals())
    command = "prefnoise " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cell_options = {k: v for k, v in fit_options.items() if v is not None}  # None: fit-reward's own default
    bar = functools.partial(progress, enabled=show_progress(json_output))
    result = compare_losses(data, out, options, overwrite=overwrite, command=command, progress_bar=bar,
                            **cell_options)
    if json_output:
        emit_json(result.summary)
        return
    _print(result.summary, out)


def _print(summary: dict[str, Any], out: Path) -> None:
    key = headline(summary)
    rates = sorted({cell["rate"] for cell in summary["cells"]})
    table = Table(title=f"held-out {summary['metric']} (95% intervals over prompts and seeds)")
    table.add_column("loss")
    for rate in rates:
        table.add_column(f"rate {rate:g}", justify="right")
    for loss in dict.fromkeys(cell["loss"] for cell in summary["cells"]):
        cells = [c[key] for c in summary["cells"] if c["loss"] == loss]
        table.add_row(loss, *(f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" for c in cells))
    console.print(table)
    for comparison in summary["comparisons"]:
        console.print(f"rate {comparison['rate']:g}: {comparison['verdict']}")
    console.print(f"→ {out}/ (results.parquet, results.md, summary.json, robustness.png)")


def _with_fit_reward_options(command: Any) -> Any:
    """``command`` with fit-reward's options (those that apply per cell) appended to its signature, so the
    grid takes every option fit-reward takes, defined once in the fit-reward command. An option left out is
    None: fit-reward's own default applies."""
    hints = {**get_type_hints(fit_reward_command, include_extras=True),
             **get_type_hints(command, include_extras=True)}
    own = inspect.signature(command)
    mine = [p.replace(annotation=hints[p.name]) for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    borrowed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hints[name])
                for name, p in inspect.signature(fit_reward_command).parameters.items()
                if name not in NOT_PER_CELL and name not in own.parameters]
    mine = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.default is not p.empty else p for p in mine]
    command.__signature__ = own.replace(parameters=[*mine, *borrowed])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


def register(reproduce_app: typer.Typer) -> None:
    """Add the `data` subcommand (`reproduce DATA`) to the reproduce group."""
    reproduce_app.command(DATA_COMMAND)(cli_errors(_with_fit_reward_options(data_command)))
    register_options(f"reproduce {DATA_COMMAND}", ComparisonOptions)
