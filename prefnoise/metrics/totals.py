"""Per-prompt results of a rank check summed over buckets, per split column and code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from prefnoise.metrics.agreement import NO_PAIR, OUTCOME_DENOMINATORS, OUTCOME_VALUES, agreements_from_cells, pair_cells
from prefnoise.metrics.names import SPLIT_COL
from prefnoise.metrics.rankstats import tau_b
from prefnoise.metrics.results import Agreement, Preservation, RankMetrics


@dataclass
class PromptTotals:
    """Per-prompt results summed over buckets, per split column and code."""

    sizes: list[int]

    def __post_init__(self) -> None:
        zeros = [np.zeros(size) for size in self.sizes]
        self.prompts, self.preserved, self.unordered = ([z.copy() for z in zeros] for _ in range(3))
        self.tau_sum, self.tau_count, self.rho_sum, self.rho_count, self.n_prompts, self.true_ties = (
            [z.copy() for z in zeros] for _ in range(6)
        )
        self.cells: list[list[pl.DataFrame]] = [[] for _ in self.sizes]
        self.pair_cells: list[list[pl.DataFrame]] = [[] for _ in self.sizes]  # pair tables' outcomes per prompt

    def merge(self, other: PromptTotals) -> None:
        """Add ``other``'s totals (another bucket's prompts) to these: sums and the cell tables."""
        for name in ("prompts", "preserved", "unordered", "tau_sum", "tau_count", "rho_sum", "rho_count",
                     "n_prompts", "true_ties"):
            for mine, theirs in zip(getattr(self, name), getattr(other, name), strict=True):
                mine += theirs
        for name in ("cells", "pair_cells"):
            for mine, theirs in zip(getattr(self, name), getattr(other, name), strict=True):
                mine.extend(theirs)

    def add_pair_outcomes(self, j: int, group: np.ndarray, out: np.ndarray, size: int) -> None:
        """A pair table's outcomes summed per (prompt, split) ``group`` code: one cluster each."""
        mine = out != NO_PAIR
        if not mine.any():
            return
        groups, index = np.unique(group[mine], return_inverse=True)
        counts = np.zeros((len(groups), 4))
        np.add.at(counts, (index.reshape(-1), out[mine].astype(np.int64)), 1.0)
        cells = pl.DataFrame(
            {
                SPLIT_COL: groups % size,
                "num": counts @ OUTCOME_VALUES,
                "den": counts @ OUTCOME_DENOMINATORS,
                "pties": counts[:, 1],
                "tties": counts[:, 3],
            }
        )
        sums = (pl.len().alias("count"), pl.col("pties").sum(), pl.col("tties").sum())
        self.pair_cells[j].append(cells.group_by(SPLIT_COL, "num", "den").agg(*sums))

    def clusters(self, j: int, pairs: bool) -> int:
        """How many prompt clusters the agreement of column ``j`` resamples (all splits together)."""
        parts = (self.pair_cells if pairs else self.cells)[j]
        return int(sum(int(part["count"].sum()) for part in parts))

    def add_flags(self, j: int, split: np.ndarray, ok: np.ndarray, ordered: np.ndarray) -> None:
        """Count prompts per split code: ``ordered`` ones (some strict true order), ``ok`` ones kept."""
        size = self.sizes[j]
        self.prompts[j] += np.bincount(split[ordered], minlength=size)
        self.preserved[j] += np.bincount(split[ordered & ok], minlength=size)
        self.unordered[j] += np.bincount(split[~ordered], minlength=size)

    def add_prompts(self, j: int, stats: dict[str, np.ndarray], size: int) -> None:
        """Add per-prompt rank statistics: preservation, tau and rho sums, agreement cells."""
        split = stats["split"]
        strict = stats["n0"] - stats["n1"]  # pairs with a strict true order
        pred_only_ties = stats["n2"] - stats["n3"]
        concordant = strict - pred_only_ties - stats["dis"]
        self.add_flags(j, split, concordant == strict, strict > 0)
        for values, total, count in (
            (tau_b(stats), self.tau_sum, self.tau_count),
            (stats["rho"], self.rho_sum, self.rho_count),
        ):
            ok = np.isfinite(values)
            total[j] += np.bincount(split[ok], weights=values[ok], minlength=size)
            count[j] += np.bincount(split[ok], minlength=size)
        self.n_prompts[j] += np.bincount(split, minlength=size)
        self.true_ties[j] += np.bincount(split, weights=stats["n1"], minlength=size)
        cells = pl.DataFrame(
            {
                SPLIT_COL: split,
                "num": concordant + 0.5 * pred_only_ties,
                "den": strict.astype(float),
                "pties": pred_only_ties.astype(float),
            }
        )
        sums = (pl.len().alias("count"), pl.col("pties").sum())
        self.cells[j].append(cells.group_by(SPLIT_COL, "num", "den").agg(*sums))

    def agreements(self, j: int, order: np.ndarray, n_boot: int, seed: int, pairs: bool = False) -> list[Agreement]:
        """The agreement per code (in ``order``): over all within-prompt pairs of a long table, or
        over a pair table's pairs (``pairs``); the interval resamples prompts either way."""
        position = np.argsort(order)  # code -> its place in the sorted order
        parts = self.pair_cells[j] if pairs else self.cells[j]
        if not parts:
            empty = pair_cells(np.zeros(0, dtype=np.int64), len(order), order)
            return agreements_from_cells(empty, n_boot, seed, len(order))
        extra = [pl.col("tties").sum()] if pairs else []
        cells = (
            pl.concat(parts)
            .group_by(SPLIT_COL, "num", "den")
            .agg(pl.col("count").sum(), pl.col("pties").sum(), *extra)
            .with_columns(pl.col(SPLIT_COL).replace_strict(list(range(len(order))), position.tolist()))
        )
        if pairs:
            true_ties = np.zeros(len(order))
            for split, ties in cells.group_by(SPLIT_COL).agg(pl.col("tties").sum()).iter_rows():
                true_ties[split] = ties
            cells = cells.drop("tties")
        else:
            true_ties = self.true_ties[j][order]
        return agreements_from_cells(cells, n_boot, seed, len(order), true_ties=true_ties)

    def preservations(self, j: int, order: np.ndarray) -> list[Preservation]:
        """The preservation per code of column ``j`` (in ``order``)."""
        return [
            Preservation(float(kept / total) if total else None, int(total), int(kept), int(none))
            for total, kept, none in zip(
                self.prompts[j][order], self.preserved[j][order], self.unordered[j][order], strict=True
            )
        ]

    def means(self, j: int, order: np.ndarray) -> dict[str, np.ndarray]:
        """Mean per-prompt tau and rho, prompts with a tau, and prompts per code (in ``order``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "tau": (self.tau_sum[j] / self.tau_count[j])[order],
                "rho": (self.rho_sum[j] / self.rho_count[j])[order],
                "with_tau": self.tau_count[j][order],
                "prompts": self.n_prompts[j][order],
            }


def metrics_per_split(
    rows: np.ndarray,
    agreements: list[Agreement],
    preservations: list[Preservation],
    means: dict[str, np.ndarray] | None,
    overall: dict[str, np.ndarray] | None,
) -> list[RankMetrics]:
    """RankMetrics per code (already in sorted order); without a true reward only the pair metrics."""
    if overall is None or means is None:
        return [
            RankMetrics(rows=int(r), agreement=a, preservation=p)
            for r, a, p in zip(rows, agreements, preservations, strict=True)
        ]
    taus = tau_b(overall)
    no_responses = overall["n"] == 0
    rho = np.where(no_responses, np.nan, overall["rho"])
    return [
        RankMetrics(
            rows=int(rows[i]),
            agreement=agreements[i],
            preservation=preservations[i],
            responses=int(overall["n"][i]),
            prompts=int(means["prompts"][i]),
            kendall_tau_b=_float(taus[i]),
            spearman_rho=_float(rho[i]),
            kendall_tau_b_per_prompt=_float(means["tau"][i]),
            spearman_rho_per_prompt=_float(means["rho"][i]),
            prompts_with_tau=int(means["with_tau"][i]),
        )
        for i in range(len(rows))
    ]


def dense_codes(values: np.ndarray) -> np.ndarray:
    """Dense int64 codes (0..k-1) of ``values``, in sorted order of the values."""
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
