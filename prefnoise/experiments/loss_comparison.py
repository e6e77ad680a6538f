"""Which loss survives your noise: a loss × noise-rate × seed grid on the user's own pairs.

Each seed splits the data by prompt, injects the noise into the training part only and fits every loss on
the same flips; each model scores the untouched test part. Agreement with the test part's labels (and,
where true scores exist, with the true order and the rank correlations) is reported per cell, and each
loss's paired difference to a reference loss with an interval over prompts and seeds (:mod:`.paired`).
Cells are cached on disk as they finish, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.errors import PrefnoiseError
from prefnoise.experiments.synthetic import t_interval_halfwidth
from prefnoise.heldout import split_table
from prefnoise.loss_names import SYMMETRIC_LOSS_NAMES
from prefnoise.metrics import kendall_tau_b, spearman_rho, tie_half_outcomes
from prefnoise.metrics.paired import Estimate, cluster_codes, two_stage_mean, verdict
from prefnoise.noise import NoiseSpec, corrupt_frame
from prefnoise.options import ComparisonOptions

TRUE_METRIC, LABEL_METRIC = "agreement with the true order", "agreement with the labels"
# fit_cell(noisy train, test, loss, seed) -> the model's rewards on the test rows: shape (n, 2), chosen then rejected
FitCell = Callable[[pl.DataFrame, pl.DataFrame, str, int], np.ndarray]


def noise_spec(options: ComparisonOptions, rate: float, seed: int) -> NoiseSpec:
    """The corrupt rule of one grid rate and seed."""
    if options.noise == "asymmetric":
        return NoiseSpec(kind="asymmetric", rate_pos=rate, rate_neg=options.rate_neg, by=options.by, seed=seed)
    if options.noise == "uniform":
        return NoiseSpec(kind="uniform", max_rate=rate, seed=seed)
    return NoiseSpec(kind="symmetric", rate=rate, seed=seed)


def data_digest(frame: pl.DataFrame) -> str:
    """A short digest of a table's rows in order (for the cell cache: other data never reuses a cell). It
    rests on polars' row hash, which may change between polars versions: then cells are refitted, never
    reused wrongly."""
    hashes = np.concatenate([frame.hash_rows(seed=seed).to_numpy() for seed in (0, 1)])
    return hashlib.blake2b(hashes.tobytes() + ",".join(frame.columns).encode(), digest_size=12).hexdigest()


class CellCache:
    """One file of test rewards per (seed, rate, loss) cell under ``directory``, valid for one fingerprint."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        plan = self.directory / "plan.json"
        if plan.is_file() and json.loads(plan.read_text(encoding="utf-8")) != fingerprint:
            raise PrefnoiseError(f"{self.directory}: holds cells of another grid or other data; remove it (it is "
                                 "prefnoise's cell cache) or pass another --out")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not plan.is_file():
            with atomic_path(plan) as tmp:
                tmp.write_text(json.dumps(fingerprint, sort_keys=True), encoding="utf-8")

    def _path(self, seed: int, rate: float, loss: str) -> Path:
        return self.directory / f"seed{seed}-rate{rate:g}-{loss}.npy"

    def get(self, seed: int, rate: float, loss: str) -> np.ndarray | None:
        """The cached rewards of a cell, or None."""
        path = self._path(seed, rate, loss)
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def put(self, seed: int, rate: float, loss: str, rewards: np.ndarray) -> None:
        """Store a finished cell (atomically: an interrupted write leaves no cell)."""
        with atomic_path(self._path(seed, rate, loss)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.asarray(rewards, dtype=np.float64), allow_pickle=False)

    def count(self) -> int:
        """How many cells are cached."""
        return len(list(self.directory.glob("seed*-rate*.npy")))


def seeded_split(frame: pl.DataFrame, options: ComparisonOptions, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The train/test split of one seed; PrefnoiseError when either side is empty."""
    train, test = split_table(frame, test_fraction=options.test_fraction, by=options.split_by, seed=seed)
    if train.height == 0 or test.height == 0:
        units = frame[C.PROMPT].n_unique() if options.split_by == "prompt" else frame.height
        raise PrefnoiseError(f"DATA: {frame.height} pairs ({units} {options.split_by}s) split into {train.height} "
                             f"train and {test.height} test pairs at --test-fraction {options.test_fraction:g} "
                             f"(seed {seed}); use more data or another --test-fraction")
    return train, test


def check_grid(frame: pl.DataFrame, options: ComparisonOptions) -> None:
    """PrefnoiseError, before anything runs, when a seed's split leaves a side empty or the noise rule cannot
    apply to this table (a missing column for ``by``, say)."""
    for index in range(options.seeds):
        seeded_split(frame, options, options.seed + index)
    noise_spec(options, max(options.rates), options.seed).check(frame.schema)


def run_grid(
    frame: pl.DataFrame,
    options: ComparisonOptions,
    fit_cell: FitCell,
    cache: CellCache | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> pl.DataFrame:
    """Every cell's test rewards: one row per (seed, rate, loss, test pair) with the pair's prompt, margin and
    outcomes against the labels and (with true scores) the true order. Cached cells are read back, not refitted."""
    parts = []
    for index in range(options.seeds):
        seed = options.seed + index
        train, test = seeded_split(frame, options, seed)
        for rate in options.rates:
            noisy, _ = corrupt_frame(train, noise_spec(options, rate, seed))
            for loss in options.all_losses:
                started = time.perf_counter()
                rewards = cache.get(seed, rate, loss) if cache else None
                cached = rewards is not None
                if rewards is None:
                    rewards = np.asarray(fit_cell(noisy, test, loss, seed), dtype=np.float64)
                    if cache:
                        cache.put(seed, rate, loss, rewards)
                parts.append(_cell_rows(test, rewards, seed, rate, loss))
                if on_cell is not None:
                    on_cell({"seed": seed, "rate": rate, "loss": loss, "cached": cached,
                             "seconds": round(time.perf_counter() - started, 3)})
    return pl.concat(parts)


def _cell_rows(test: pl.DataFrame, rewards: np.ndarray, seed: int, rate: float, loss: str) -> pl.DataFrame:
    if rewards.shape != (test.height, 2):
        raise PrefnoiseError(f"a cached or fitted cell has rewards of shape {rewards.shape} for {test.height} "
                             "test pairs")
    margins = rewards[:, 0] - rewards[:, 1]
    true = _true_margin(test)
    return pl.DataFrame({
        "seed": np.full(test.height, seed), "rate": np.full(test.height, rate), "loss": [loss] * test.height,
        C.PAIR_ID: test[C.PAIR_ID].cast(pl.String), C.PROMPT: test[C.PROMPT],
        C.chosen(C.REWARD): rewards[:, 0], C.rejected(C.REWARD): rewards[:, 1],
        C.chosen(C.SCORE): _score(test, C.chosen(C.SCORE)), C.rejected(C.SCORE): _score(test, C.rejected(C.SCORE)),
        "label_outcome": tie_half_outcomes(margins),
        "true_outcome": tie_half_outcomes(margins, true) if true is not None else np.full(test.height, np.nan),
    })


def _score(test: pl.DataFrame, column: str) -> np.ndarray:
    return test[column].cast(pl.Float64).to_numpy() if column in test.columns else np.full(test.height, np.nan)


def _true_margin(test: pl.DataFrame) -> np.ndarray | None:
    chosen, rejected = C.chosen(C.SCORE), C.rejected(C.SCORE)
    if chosen not in test.columns or rejected not in test.columns:
        return None
    return (test[chosen].cast(pl.Float64) - test[rejected].cast(pl.Float64)).fill_null(0.0).to_numpy()


def _per_seed(rows: pl.DataFrame, column: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    values, clusters = [], []
    for (_,), part in rows.group_by(["seed"], maintain_order=True):  # rows come seed by seed, in test order
        values.append(part[column].to_numpy())
        clusters.append(cluster_codes(part[C.PROMPT].to_list()))
    return values, clusters


def summarize(rows: pl.DataFrame, options: ComparisonOptions) -> dict[str, Any]:
    """Per-cell agreements and the paired comparisons to the reference, as ``--json`` prints them."""
    metric = "true_outcome" if rows["true_outcome"].is_not_nan().any() else "label_outcome"
    cells, comparisons = [], []
    for rate in options.rates:
        at_rate = rows.filter(pl.col("rate") == rate)
        reference = at_rate.filter(pl.col("loss") == options.reference)  # the same pairs, in the same order
        for loss in options.all_losses:
            mine = at_rate.filter(pl.col("loss") == loss)
            cells.append({"loss": loss, "rate": rate, **_cell_summary(mine, options)})
            if loss == options.reference:
                continue
            paired = mine.with_columns((pl.col(metric) - reference[metric]).alias("difference"))
            estimate = two_stage_mean(*_per_seed(paired, "difference"), n_boot=options.bootstrap, seed=options.seed)
            comparisons.append({"loss": loss, "reference": options.reference, "rate": rate,
                                "difference": estimate.value, "low": estimate.low, "high": estimate.high,
                                "test_pairs": estimate.pairs, "seeds": estimate.seeds,
                                "verdict": verdict(loss, options.reference, estimate)})
    return {"metric": TRUE_METRIC if metric == "true_outcome" else LABEL_METRIC,
            "cells": cells, "comparisons": comparisons}


def _estimate(rows: pl.DataFrame, column: str, options: ComparisonOptions) -> dict[str, float] | None:
    if not rows[column].is_not_nan().any():
        return None
    estimate: Estimate = two_stage_mean(*_per_seed(rows, column), n_boot=options.bootstrap, seed=options.seed)
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high}


def _cell_summary(rows: pl.DataFrame, options: ComparisonOptions) -> dict[str, Any]:
    return {"symmetric": rows["loss"][0] in SYMMETRIC_LOSS_NAMES if rows.height else None,
            "label_agreement": _estimate(rows, "label_outcome", options),
            "true_agreement": _estimate(rows, "true_outcome", options),
            **_correlations(rows)}


def _correlations(rows: pl.DataFrame) -> dict[str, Any]:
    """Kendall tau-b and Spearman rho of the learned against the true rewards over the test responses, per
    seed, as their mean over seeds with a t-interval over seeds (None without true scores)."""
    if not rows[C.chosen(C.SCORE)].is_not_nan().any():
        return {"kendall": None, "spearman": None}
    taus, rhos = [], []
    for (_,), part in rows.group_by(["seed"], maintain_order=True):
        pred = np.concatenate([part[C.chosen(C.REWARD)].to_numpy(), part[C.rejected(C.REWARD)].to_numpy()])
        true = np.concatenate([part[C.chosen(C.SCORE)].to_numpy(), part[C.rejected(C.SCORE)].to_numpy()])
        keep = np.isfinite(pred) & np.isfinite(true)
        taus.append(kendall_tau_b(pred[keep], true[keep]))
        rhos.append(spearman_rho(pred[keep], true[keep]))
    return {"kendall": _over_seeds(taus), "spearman": _over_seeds(rhos)}


def _over_seeds(values: list[float]) -> dict[str, float]:
    mean = float(np.mean(values))
    half = t_interval_halfwidth(float(np.std(values, ddof=1)), len(values)) if len(values) > 1 else None
    return {"value": mean, "low": mean - half if half is not None else float("nan"),
            "high": mean + half if half is not None else float("nan")}


def headline(summary: dict[str, Any]) -> str:
    """The cell key of the summary's headline metric: ``true_agreement`` or ``label_agreement``."""
    return "true_agreement" if summary["metric"] == TRUE_METRIC else "label_agreement"


def comparison_markdown(summary: dict[str, Any], options: ComparisonOptions, command: str) -> str:
    """The results as a Markdown report: the agreement table, the verdicts, the command."""
    key = headline(summary)
    lines = [f"# Which loss survives this noise ({summary['metric']})", "", f"Command: `{command}`", "",
             "| loss | " + " | ".join(f"rate {r:g}" for r in options.rates) + " |",
             "|---|" + "---|" * len(options.rates)]
    for loss in options.all_losses:
        row = [c[key] for c in summary["cells"] if c["loss"] == loss]
        lines.append(f"| {loss} | " + " | ".join(f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" for c in row)
                     + " |")
    lines += ["", f"Paired differences to {options.reference} (95% intervals over prompts and seeds):", ""]
    lines += [f"- rate {c['rate']:g}: {c['verdict']}" for c in summary["comparisons"]]
    return "\n".join(lines) + "\n"


def figure_frame(summary: dict[str, Any]) -> pl.DataFrame:
    """Mean and half-interval per (loss, rate) in the shape :func:`robustness_figure` draws."""
    key = headline(summary)
    return pl.DataFrame([{"kind": "injected", "loss": c["loss"], "rate": c["rate"], "mean": c[key]["value"],
                          "std": (c[key]["high"] - c[key]["low"]) / 2} for c in summary["cells"]])
