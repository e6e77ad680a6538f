"""pn.reproduce: the paper's robustness experiments, end to end (the `reproduce` command)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise.api.tables import ProgressBar, no_bar
from prefnoise.errors import PrefnoiseError
from prefnoise.experiments import with_overrides
from prefnoise.options import Options, ReproduceAlignmentOptions, ReproduceSyntheticOptions
from prefnoise.options.reproduce import REPRODUCE_OPTIONS

REPRODUCE = "reproduce"
_OPTION_KEYWORDS = {f.name for cls in REPRODUCE_OPTIONS.values() for f in dataclasses.fields(cls)}


@dataclass
class ReproduceResult:
    """``pn.reproduce``'s result: one row per grid cell, the mean ± std table, and the summary
    (``reproduce ... --json``'s object)."""

    results: pl.DataFrame
    table: pl.DataFrame
    summary: dict[str, Any]
    config: Any = None  # the grid that ran (prefnoise.experiments' SyntheticConfig or AlignmentConfig)


def reproduce(
    experiment: str,
    out: str | Path | None = None,
    options: Options | None = None,
    *,
    quick: bool | None = None, seeds: int | None = None, epochs: int | None = None, device: str | None = None,
    source: str | None = None, noise: str | Sequence[str] | None = None, rates: str | Sequence[float] | None = None,
    losses: str | Sequence[str] | None = None, train_pairs: int | None = None, test_pairs: int | None = None,
    batch_size: int | None = None, mnist: str | Path | None = None,
    pairs: int | None = None, asymmetric: bool | None = None,
    overwrite: bool = False,
    progress_bar: ProgressBar | None = None,
    command_line: str | None = None,
) -> ReproduceResult:
    """``prefnoise reproduce synthetic|alignment``: rerun one of the paper's robustness grids.

    ``experiment``: "synthetic" (reward models on digit images, paper Sec. 5.1; ``source="mnist"`` for MNIST
    and the paper's CNN) or "alignment" (SymPO against DPO and friends on a tiny LM, Sec. 5.2). Options:
    :class:`prefnoise.options.ReproduceSyntheticOptions` (quick ... mnist) or
    :class:`prefnoise.options.ReproduceAlignmentOptions` (quick, seeds, epochs, pairs, asymmetric, device); a
    keyword left None keeps the experiment's default, one the experiment lacks is a TypeError. With ``out``,
    results.parquet, results.md (recording ``command_line``) and robustness.png are written there.
    """
    from prefnoise.outputs import check_output_dir

    cls = REPRODUCE_OPTIONS.get(experiment)
    if cls is None:
        raise PrefnoiseError(f"unknown experiment {experiment!r}; choose one of: {', '.join(REPRODUCE_OPTIONS)}")
    values = {k: v for k, v in locals().items() if k in _OPTION_KEYWORDS and v is not None}
    if options is not None and values:
        raise TypeError("give options= or option keywords, not both")
    options = options if options is not None else cls(**values)
    if not isinstance(options, cls):
        raise TypeError(f"options= for {experiment} takes a {cls.__name__}, got {type(options).__name__}")
    grid, run = _EXPERIMENTS[experiment]
    config = grid(options)
    if out is not None:
        check_output_dir(out, command=REPRODUCE, inputs=[getattr(options, "mnist", None)], overwrite=overwrite)
    with (progress_bar or no_bar)("grid", config.cells()) as advance:
        return run(options, config, out, advance, command_line or _call_text(experiment, options))


def _call_text(experiment: str, options: Options) -> str:
    """How results.md records a Python call: ``pn.reproduce('synthetic', quick=True)``."""
    defaults = type(options)()
    changed = [f"{k}={v!r}" for k, v in vars(options).items() if v != getattr(defaults, k)]
    return f"pn.reproduce({', '.join([repr(experiment), *changed])})"


def _write_outputs(out: str | Path, results: pl.DataFrame, markdown: str, draw: Callable[[Path], object]) -> None:
    """results.parquet, results.md and robustness.png into ``out``, all or nothing."""
    from prefnoise.atomic import atomic_path

    with atomic_path(Path(out), directory=True, command=REPRODUCE) as tmp:
        results.write_parquet(tmp / "results.parquet")
        (tmp / "results.md").write_text(markdown)
        draw(tmp / "robustness.png")


def _synthetic_config(options: ReproduceSyntheticOptions) -> Any:
    """The grid of the synthetic options: the preset (full, quick, mnist) with the overrides, checked."""
    from prefnoise.experiments import synthetic as S

    if options.source == "mnist":
        config = S.SyntheticConfig.mnist()
        if options.quick:
            config = with_overrides(config, seeds=1, train_pairs=300, test_pairs=300, epochs=5, rates=(0.0, 0.4))
    else:
        config = S.SyntheticConfig.quick() if options.quick else S.SyntheticConfig()
    config = with_overrides(
        config, source=options.source, seeds=options.seeds, epochs=options.epochs, train_pairs=options.train_pairs,
        test_pairs=options.test_pairs, batch_size=options.batch_size, kinds=options.noise, rates=options.rates,
        losses=options.losses,
    )
    config.check()
    return config


def _synthetic(
    options: ReproduceSyntheticOptions, config: Any, out: str | Path | None, advance: Callable[[int], None],
    command: str,
) -> ReproduceResult:
    """Run the synthetic grid; write it to ``out``; summarise the highest rate."""
    from prefnoise.experiments import synthetic as S
    from prefnoise.experiments.figures import robustness_figure

    mnist = None if options.mnist is None else Path(options.mnist)
    results = S.run_synthetic(config, mnist=mnist, device=options.device, on_cell=lambda row: advance(1))
    table = S.summary(results)
    source = "MNIST, the paper's CNN" if config.source == "mnist" else "digits, MLP"
    title = f"Reward models under label noise ({source}; held-out pairs)"
    if out is not None:
        _write_outputs(out, results, S.summary_markdown(results, config, command), lambda path: robustness_figure(
            table, path, symmetric_losses=S.SYMMETRIC_LOSSES, title=title))
    top = max(config.rates)
    symmetric = [x for x in config.losses if x in S.SYMMETRIC_LOSSES]
    summary = {
        "output": None if out is None else str(out), "source": config.source, "cells": results.height,
        "fits": config.fits(), "highest_rate": top,
        "mean_agreement_at_highest_rate": {
            "symmetric": S.mean_agreement_at(results, top, symmetric) if symmetric else None,
            "logistic": S.mean_agreement_at(results, top, ["logistic"]) if "logistic" in config.losses else None,
        },
        "symmetric_minus_others": S.symmetric_gain(results).to_dicts(),
    }
    return ReproduceResult(results, table, summary, config)


def _alignment_config(options: ReproduceAlignmentOptions) -> Any:
    """The alignment grid: the preset (full or quick) with the overrides."""
    from prefnoise.experiments import alignment as A

    config = A.AlignmentConfig.quick() if options.quick else A.AlignmentConfig()
    return with_overrides(
        config, seeds=options.seeds, epochs=options.epochs, pairs=options.pairs,
        asymmetric=None if options.asymmetric else (),
    )


def _alignment(
    options: ReproduceAlignmentOptions, config: Any, out: str | Path | None, advance: Callable[[int], None],
    command: str,
) -> ReproduceResult:
    """Run the alignment grid; write it to ``out``; summarise the highest rate."""
    from prefnoise.experiments import alignment as A
    from prefnoise.experiments.figures import robustness_figure

    results = A.run_alignment(config, device=options.device, on_cell=lambda row: advance(1))
    table = A.summary(results)
    title = "Preference optimization under label noise (tiny GPT-2, generated task)"
    if out is not None:
        _write_outputs(out, results, A.summary_markdown(results, config, command), lambda path: robustness_figure(
            table, path, symmetric_losses=A.SYMMETRIC_LOSSES, y_label="held-out clean implicit-reward accuracy",
            title=title))
    top = max(config.rates)
    symmetric = [x for x in config.losses if x in A.SYMMETRIC_LOSSES]
    gain = None
    if "dpo" in config.losses:
        gain = A.mean_accuracy_at(results, top, symmetric) - A.mean_accuracy_at(results, top, ["dpo"])
    summary = {
        "output": None if out is None else str(out), "cells": results.height, "highest_rate": top,
        "mean_clean_accuracy_at_highest_rate": {
            name: A.mean_accuracy_at(results, top, [name]) for name in config.losses
        },
        "sympo_minus_dpo_at_highest_rate": gain,
    }
    return ReproduceResult(results, table, summary, config)


# experiment -> (its grid from the options, its run)
_EXPERIMENTS: dict[str, tuple[Callable[[Any], Any], Callable[..., ReproduceResult]]] = {
    "synthetic": (_synthetic_config, _synthetic),
    "alignment": (_alignment_config, _alignment),
}
