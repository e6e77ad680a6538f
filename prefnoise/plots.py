"""Figures, drawn headless with matplotlib's Agg backend: one small function per figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prefnoise import __version__  # noqa: E402
from prefnoise.atomic import atomic_path  # noqa: E402
from prefnoise.outputs import PNG_SOFTWARE  # noqa: E402


def rank_check_figure(
    true: np.ndarray,
    pred: np.ndarray,
    true_margin: np.ndarray,
    outcome: np.ndarray,
    *,
    agreement: float | None,
    out: str | Path,
    bins: int = 10,
    max_points: int = 20_000,
    seed: int = 0,
    labels: tuple[str, str] = ("true reward", "predicted reward"),
) -> Path:
    """Write a PNG: predicted vs true reward (a seeded sample of points) with the agreement in the
    title, beside pairwise agreement per bin of |true margin|; returns the path written."""
    fig, (scatter, curve) = plt.subplots(1, 2, figsize=(10, 4.2))
    if len(true) > max_points:
        keep = np.random.default_rng(seed).choice(len(true), max_points, replace=False)
        true, pred = true[keep], pred[keep]
    scatter.scatter(true, pred, s=4, alpha=0.4, linewidths=0)
    scatter.set_xlabel(labels[0])
    scatter.set_ylabel(labels[1])
    title = "n/a" if agreement is None else f"{agreement:.3f}"
    scatter.set_title(f"pairwise agreement {title}")
    centers, values, counts = agreement_by_margin(true_margin, outcome, bins)
    curve.plot(centers, values, marker="o")
    curve.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    curve.set_ylim(0, 1.02)
    curve.set_xlabel("|true margin| (bin centre, equal-count bins)")
    curve.set_ylabel("pairwise agreement")
    curve.set_title(f"agreement vs true margin ({int(counts.sum()):,} pairs)")
    fig.tight_layout()
    save_png(fig, out, dpi=100)
    return Path(out)


def save_png(fig, out: str | Path, *, dpi: int) -> None:
    """Write ``fig`` to ``out`` as a PNG atomically, marked as prefnoise's (so a rerun may replace it), then
    close it."""
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    finally:
        plt.close(fig)


def agreement_by_margin(
    true_margin: np.ndarray, outcome: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin centres, mean outcome and pair count per equal-count bin of |true margin|."""
    size = np.abs(np.asarray(true_margin, dtype=float))
    outcome = np.asarray(outcome, dtype=float)
    if size.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(size, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, size, side="right") - 1, 0, max(len(edges) - 2, 0))
    counts = np.bincount(which, minlength=max(len(edges) - 1, 1))
    sums = np.bincount(which, weights=outcome, minlength=len(counts))
    centers = np.array([size[which == i].mean() if counts[i] else np.nan for i in range(len(counts))])
    with np.errstate(invalid="ignore", divide="ignore"):
        return centers, sums / counts, counts
