"""Figures of the reproductions (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl


def robustness_figure(
    summary: pl.DataFrame,
    path: str | Path,
    *,
    symmetric_losses: Sequence[str],
    x: str = "rate",
    panel: str = "kind",
    y_label: str = "held-out agreement with the true reward",
    title: str = "",
) -> Path:
    """Mean ± std of a metric against noise rate: a line per loss (symmetric solid, others dashed), a panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = summary[panel].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True, squeeze=False)
    losses = summary["loss"].unique(maintain_order=True).to_list()
    colors = plt.get_cmap("tab10")
    for ax, name in zip(axes[0], panels):
        for i, loss in enumerate(losses):
            rows = summary.filter((pl.col(panel) == name) & (pl.col("loss") == loss)).sort(x)
            if rows.height == 0:
                continue
            xs, mean = rows[x].to_numpy(), rows["mean"].to_numpy()
            std = rows["std"].fill_null(0.0).to_numpy()
            style = "-" if loss in symmetric_losses else "--"
            ax.plot(xs, mean, style, marker="o", color=colors(i), label=loss, linewidth=2 if style == "-" else 1.4)
            ax.fill_between(xs, mean - std, mean + std, color=colors(i), alpha=0.12)
        ax.set_title(f"{name} noise")
        ax.set_xlabel("noise rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(y_label)
    axes[0][-1].legend(title="loss (solid: symmetric)", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    from prefnoise.plots import save_png

    save_png(fig, path, dpi=120)
    return path


def margin_histogram(margins, mixture, path: str | Path) -> Path:
    """Histogram of out-of-fold margins with the fitted clean and mirrored (flipped) components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    margins = np.asarray(margins, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(margins, bins=60, density=True, color="0.75", label="out-of-fold margins")
    grid = np.linspace(margins.min(), margins.max(), 400)

    def normal(x, mu):
        return np.exp(-0.5 * ((x - mu) / mixture.std) ** 2) / (mixture.std * np.sqrt(2 * np.pi))

    if mixture is not None:  # None: the flip rate is undetermined (prefnoise.noise_audit), so no components are drawn
        ax.plot(grid, (1 - mixture.rate) * normal(grid, mixture.mean), label="clean component", linewidth=2)
        ax.plot(
            grid, mixture.rate * normal(grid, -mixture.mean), "--", label="flipped (mirrored) component", linewidth=2
        )
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("margin r(chosen) − r(rejected), out of fold")
    ax.set_ylabel("density")
    ax.set_title("flip rate undetermined" if mixture is None else f"estimated flip rate ε̂ = {mixture.rate:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    from prefnoise.plots import save_png

    save_png(fig, path, dpi=120)
    return path
