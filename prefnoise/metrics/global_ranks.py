"""Kendall's tau-b and Spearman's rho over all responses, from buckets by reward value.

A table too large to sort in memory is split by cut points of the true reward (x) into buckets in
value order; :class:`GlobalRanks` passes over them, then over buckets by the predicted reward (y),
and adds up the pair counts and rank sums that tau-b and rho need, exactly, per split code. Each
bucket is sorted in memory by :mod:`prefnoise.metrics.rankstats`; buckets are :class:`prefnoise.metrics.spill.Buckets`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from prefnoise.metrics.rankstats import correlation, orders, x_side_stats
from prefnoise.metrics.spill import Buckets


class GlobalRanks:
    """Kendall's tau-b and Spearman's rho over all responses, per split code, from value buckets.

    The cut points split each reward into buckets in value order: the open range below the first
    cut, the cut value itself (a *point* bucket), the range up to the next cut, and so on, so a
    reward value held by many responses (a discrete score) sits alone in a point bucket.

    Pass over true-reward (x) buckets, lowest first: in a range bucket, pairs are counted exactly
    (x ties, x-and-y ties, discordant pairs); a point bucket's pairs all tie in x (no discordant
    pair) and are streamed in chunks. Each response's global average x rank is its rank in the
    bucket plus the responses of its code in lower buckets. Responses then go to predicted-reward
    (y) buckets, carrying that rank and their x bucket. Pass over y buckets, lowest first: y ties;
    discordant pairs inside the bucket, ordering by x bucket (two responses of one x bucket were
    counted already); for each response, the responses of earlier y buckets in a higher x bucket
    (discordant across buckets); x-and-y ties of responses from x point buckets; the y rank as
    before. Spearman's rho comes from the two ranks, centred on their known mean (n + 1) / 2.
    """

    def __init__(
        self,
        sizes: list[int],
        x_bounds: np.ndarray,
        y_bounds: np.ndarray,
        *,
        chunk: int,
        temp_dir: str | Path | None,
        stack: ExitStack,
        progress: Callable[[int, float], None],
    ) -> None:
        """``sizes``: codes per split column (column 0 is the whole table); the cut points of the
        true (x) and predicted (y) rewards; ``chunk``: responses read at a time from a point
        bucket; buckets are created under ``temp_dir`` and closed by ``stack``; ``progress(pass,
        fraction)`` with pass 0 for x buckets and 1 for y buckets."""
        self.sizes, self.x_bounds, self.y_bounds = sizes, x_bounds, y_bounds
        self.columns = range(len(sizes))
        self.chunk, self.temp_dir, self.stack, self.progress = chunk, temp_dir, stack, progress
        self.stats = [
            {name: np.zeros(size) for name in ("n", "n1", "n2", "n3", "dis", "sxy", "sxx", "syy")} for size in sizes
        ]
        self.offsets = [np.zeros(size) for size in sizes]  # responses of each code in the buckets done so far

    def run(self, x_buckets: Buckets) -> list[dict[str, np.ndarray]]:
        """Pass over ``x_buckets`` (fields x, y, c<j>, k<j>; bucket numbers from
        :func:`value_bucket`), then over the y buckets it fills; per split column, arrays over
        codes: n, n0 (all pairs), n1 (x ties), n2 (y ties), n3 (ties in both), dis, rho."""
        fields = [("y", "f8"), ("xb", "i4")] + [(f"c{j}", "i4") for j in self.columns if j]
        fields += [(f"k{j}", "?") for j in self.columns] + [(f"r{j}", "f8") for j in self.columns]
        y_buckets = self.stack.enter_context(Buckets(fields, 2 * len(self.y_bounds) + 1, self.temp_dir))
        for i in range(x_buckets.n):
            if _is_point(i):
                self._x_point(x_buckets, i, y_buckets)
            else:
                self._x_range(x_buckets.read(i), i, y_buckets)
            self.progress(0, (i + 1) / x_buckets.n)
        x_buckets.close()
        self.offsets = [np.zeros(size) for size in self.sizes]
        self.below = [np.zeros((size, x_buckets.n + 1)) for size in self.sizes]  # earlier y buckets, per x bucket
        for i in range(y_buckets.n):
            if _is_point(i):
                self._y_point(y_buckets, i)
            else:
                self._y_range(y_buckets.read(i))
            self.progress(1, (i + 1) / y_buckets.n)
        y_buckets.close()
        result = []
        for totals in self.stats:
            n = totals["n"]
            rho = correlation(totals["sxy"], totals["sxx"], totals["syy"])
            result.append({**{k: totals[k] for k in ("n", "n1", "n2", "n3", "dis")}, "n0": n * (n - 1) / 2, "rho": rho})
        return result

    def _code(self, rec: dict[str, np.ndarray], j: int) -> np.ndarray:
        return rec[f"c{j}"].astype(np.int64) if j else np.zeros(len(rec[f"k{j}"]), dtype=np.int64)

    def _counts(self, buckets: Buckets, i: int) -> list[np.ndarray]:
        """Kept responses per code of every column in bucket ``i`` (one streamed read)."""
        counts = [np.zeros(size) for size in self.sizes]
        for rec in buckets.read_chunks(i, self.chunk):
            for j in self.columns:
                counts[j] += np.bincount(self._code(rec, j)[rec[f"k{j}"]], minlength=self.sizes[j])
        return counts

    # -- true-reward buckets

    def _x_range(self, rec: dict[str, np.ndarray], i: int, y_buckets: Buckets) -> None:
        if not len(rec["x"]):
            return
        ranked = orders(rec["x"], rec["y"])
        out = {"y": rec["y"], "xb": np.full(len(rec["x"]), i, dtype=np.int32)}
        for j in self.columns:
            code = self._code(rec, j)
            part, ranks = x_side_stats(ranked, code, rec[f"k{j}"])
            for name in ("n", "n1", "n3", "dis"):
                self.stats[j][name][part["code"]] += part[name]
            out |= {f"c{j}": code, f"k{j}": rec[f"k{j}"], f"r{j}": ranks + self.offsets[j][code]}
            self.offsets[j][part["code"]] += part["n"]
        y_buckets.add(out, value_bucket(self.y_bounds, rec["y"]))

    def _x_point(self, x_buckets: Buckets, i: int, y_buckets: Buckets) -> None:
        """Every response of a point bucket has the same x: c responses of a code tie in c(c-1)/2
        pairs and share the average rank; their x-and-y ties are counted in the y buckets."""
        counts = self._counts(x_buckets, i)
        rank = [self.offsets[j] + (counts[j] + 1) / 2 for j in self.columns]
        for rec in x_buckets.read_chunks(i, self.chunk):
            out = {"y": rec["y"], "xb": np.full(len(rec["y"]), i, dtype=np.int32)}
            for j in self.columns:
                code = self._code(rec, j)
                out |= {f"c{j}": code, f"k{j}": rec[f"k{j}"], f"r{j}": np.where(rec[f"k{j}"], rank[j][code], np.nan)}
            y_buckets.add(out, value_bucket(self.y_bounds, rec["y"]))
        for j in self.columns:
            self.stats[j]["n"] += counts[j]
            self.stats[j]["n1"] += counts[j] * (counts[j] - 1) / 2
            self.offsets[j] += counts[j]

    # -- predicted-reward buckets

    def _y_range(self, rec: dict[str, np.ndarray]) -> None:
        if not len(rec["y"]):
            return
        xb = rec["xb"].astype(np.int64)
        ranked = orders(rec["y"], xb.astype(float))
        from_point = _is_point(xb)
        for j in self.columns:
            code, keep, totals = self._code(rec, j), rec[f"k{j}"], self.stats[j]
            part, ranks = x_side_stats(ranked, code, keep)
            totals["n2"][part["code"]] += part["n1"]
            totals["dis"][part["code"]] += part["dis"]
            if from_point.any():  # equal y and the same x point bucket: tied in both
                ties, _ = x_side_stats(ranked, code, keep & from_point)
                totals["n3"][ties["code"]] += ties["n3"]
            higher = self._higher(j)
            self._across_and_spearman(j, code, keep, xb, rec[f"r{j}"], ranks + self.offsets[j][code], higher)
            self.below[j] += self._per_x_bucket(j, code, keep, xb)
            self.offsets[j][part["code"]] += part["n"]

    def _y_point(self, y_buckets: Buckets, i: int) -> None:
        """Every response of a point bucket has the same y: no discordant pair inside, c(c-1)/2 y
        ties per code, x-and-y ties among responses of one x point bucket, a shared average rank."""
        counts = self._counts(y_buckets, i)
        higher = [self._higher(j) for j in self.columns]
        added = [np.zeros_like(below) for below in self.below]
        for rec in y_buckets.read_chunks(i, self.chunk):
            xb = rec["xb"].astype(np.int64)
            for j in self.columns:
                code, keep = self._code(rec, j), rec[f"k{j}"]
                rank = self.offsets[j] + (counts[j] + 1) / 2
                self._across_and_spearman(j, code, keep, xb, rec[f"r{j}"], rank[code], higher[j])
                added[j] += self._per_x_bucket(j, code, keep, xb)
        for j in self.columns:
            totals = self.stats[j]
            totals["n2"] += counts[j] * (counts[j] - 1) / 2
            same_x = added[j][:, 1::2]  # responses per (code, x point bucket)
            totals["n3"] += (same_x * (same_x - 1) / 2).sum(axis=1)
            self.below[j] += added[j]
            self.offsets[j] += counts[j]

    def _higher(self, j: int) -> np.ndarray:
        """[code, b]: responses of earlier y buckets in x bucket b or higher."""
        return np.cumsum(self.below[j][:, ::-1], axis=1)[:, ::-1]

    def _per_x_bucket(self, j: int, code: np.ndarray, keep: np.ndarray, xb: np.ndarray) -> np.ndarray:
        size, width = self.sizes[j], self.below[j].shape[1]
        return np.bincount(code[keep] * width + xb[keep], minlength=size * width).reshape(size, width).astype(float)

    def _across_and_spearman(
        self,
        j: int,
        code: np.ndarray,
        keep: np.ndarray,
        xb: np.ndarray,
        x_rank: np.ndarray,
        y_rank: np.ndarray,
        higher: np.ndarray,
    ) -> None:
        """Discordant pairs with earlier y buckets (they sit in a higher x bucket), and the
        Spearman sums of the kept responses."""
        size, totals = self.sizes[j], self.stats[j]
        g = code[keep]
        totals["dis"] += np.bincount(g, weights=higher[g, xb[keep] + 1], minlength=size)
        centre = (totals["n"][g] + 1) / 2
        dx, dy = x_rank[keep] - centre, y_rank[keep] - centre
        totals["sxy"] += np.bincount(g, weights=dx * dy, minlength=size)
        totals["sxx"] += np.bincount(g, weights=dx * dx, minlength=size)
        totals["syy"] += np.bincount(g, weights=dy * dy, minlength=size)


def cut_points(sample: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n - 1`` increasing cut points splitting ``sample``'s values into ranges of about
    equal count (fewer when values repeat)."""
    if sample.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(sample, np.linspace(0, 1, n + 1)[1:-1], method="inverted_cdf"))


def value_bucket(bounds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bucket of each value, in value order: 2k for values strictly between cut points k - 1 and
    k (the open ranges), 2k + 1 for values equal to cut point k (the point buckets)."""
    left = np.searchsorted(bounds, values, side="left")
    inside = left < len(bounds)
    point = np.zeros(len(values), dtype=np.int64)
    point[inside] = bounds[left[inside]] == values[inside]
    return 2 * left + point


def _is_point(bucket: Any) -> Any:
    return bucket % 2 == 1
