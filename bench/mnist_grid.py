"""The MNIST + CNN robustness grid of `reproduce synthetic --source mnist`, one log line per fit.

Runs two grids through the same library function as the CLI (``synthetic.run_synthetic``): symmetric
noise at the given rates and feature-correlated noise at ``--feature-rate`` only, then writes
results.parquet, results.md and robustness.png as ``prefnoise reproduce synthetic`` does. Each fit
prints its held-out agreement and CPU seconds as it finishes, so a long run can be watched and sized.

    nice -n 10 .venv/bin/python bench/mnist_grid.py --out /tmp/mnist_grid > /tmp/mnist_grid.log 2>&1 &
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from prefnoise.cli.reproduce import _write_outputs
from prefnoise.experiments import synthetic as S
from prefnoise.experiments.figures import robustness_figure
from prefnoise.outputs import check_output_dir


def main() -> None:
    """Parse the sizes, run both grids, print each fit, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-pairs", type=int, default=S.MNIST_CPU_PAIRS)
    parser.add_argument("--test-pairs", type=int, default=1_000)
    parser.add_argument("--epochs", type=int, default=S.MNIST_CPU_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=S.MNIST_CPU_BATCH)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", default="0,0.2,0.4", help="symmetric noise rates")
    parser.add_argument("--feature-rate", type=float, default=0.4, help="ε_high of feature noise (ε_low = ε/4)")
    parser.add_argument("--losses", default="logistic,hinge,sigmoid,ramp,unhinged")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--from-results", help="re-render the outputs of an earlier run's results.parquet (no fits)")
    args = parser.parse_args()

    base = replace(
        S.SyntheticConfig.mnist(),
        train_pairs=args.train_pairs,
        test_pairs=args.test_pairs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seeds=args.seeds,
        losses=tuple(args.losses.split(",")),
    )
    symmetric = replace(base, kinds=("symmetric",), rates=tuple(float(r) for r in args.rates.split(",")))
    feature = replace(base, kinds=("feature",), rates=(args.feature_rate,))
    out = Path(args.out)
    check_output_dir(out, command="reproduce")
    started = time.perf_counter()
    cpu = [time.process_time()]

    def log(row: dict) -> None:
        now = time.process_time()
        print(
            f"{time.perf_counter() - started:7.0f}s {row['kind']:9} {row['rate']:.1f} {row['loss']:9}"
            f" seed {row['seed']}"
            f" agreement {row['test_agreement']:.3f} flips {row['train_flip_rate']:.3f}"
            f" cpu {now - cpu[0]:.1f}s wall {row['seconds']:.1f}s",
            flush=True,
        )
        cpu[0] = now

    if args.from_results:
        results = pl.read_parquet(args.from_results)
    else:
        results = pl.concat(
            [S.run_synthetic(config, device=args.device, on_cell=log) for config in (symmetric, feature)],
            how="diagonal",
        )
        # rate 0 is the same data for every kind, so the clean fits are feature noise's rate-0 cells too
        # (what `reproduce synthetic` does when it reuses them)
        clean = results.filter((pl.col("kind") == "symmetric") & (pl.col("rate") == 0))
        results = pl.concat(
            [results, clean.with_columns(kind=pl.lit("feature"), seconds=0.0, reused_clean_fit=True)], how="diagonal"
        )
    rates = tuple(sorted(set(symmetric.rates) | set(feature.rates)))
    shown = replace(base, kinds=("symmetric", "feature"), rates=rates)
    command = "python bench/mnist_grid.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _write_outputs(
        out,
        results,
        S.summary_markdown(results, shown, command),
        lambda path: robustness_figure(
            S.summary(results), path, symmetric_losses=S.SYMMETRIC_LOSSES,
            title="Reward models under label noise (MNIST, the paper's CNN; held-out pairs)",
        ),
    )  # fmt: skip
    print(S.summary_markdown(results, shown, command), flush=True)
    print(S.symmetric_gain(results), flush=True)


if __name__ == "__main__":
    main()
