"""Rank statistics kernels: Kendall's tau-b and Spearman's rho per group of rows, in O(n log n).

Knight's algorithm on numpy arrays: rows are argsorted by (x, y) and by y once (polars'
multi-threaded sort, :func:`orders`), and every grouping of those rows (whole table, each split,
each prompt) then only sorts packed int64 ``(group << bits | position)`` values. Discordant pairs:
scipy's compiled Fenwick-tree count for a few large groups (numpy bit passes without scipy),
neighbour comparisons for many small groups. No Python loop over rows, nothing quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

# Above this many groups the grouped discordant-pair count walks segments instead of the
# whole array (cheaper when each group is small, e.g. one group per prompt).
_FEW_GROUPS = 64
# Groups of at most this many responses (e.g. 4 per prompt) compare neighbours instead of sorting by y.
_SMALL_GROUP = 8

# scipy's compiled Fenwick-tree count (private, hence optional): 3-4x faster than numpy passes.
# Looked up on first use (False = not yet), so importing the metrics (and the CLI) does not load scipy.
_scipy_discordant: Any = False


def _compiled_discordant() -> Any:
    global _scipy_discordant
    if _scipy_discordant is False:
        try:
            from scipy.stats._stats import _kendall_dis as found  # scipy is heavy: loaded only when used
        except ImportError:  # pragma: no cover
            found = None
        _scipy_discordant = found
    return _scipy_discordant


# --------------------------------------------------------------------------- rank statistics


def rank_stats(keys: tuple[np.ndarray, ...], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per group (rows sharing all ``keys``; ``keys[0]`` is the split code), in key order:
    n, pair counts n0 (all), n1 (x ties), n2 (y ties), n3 (ties in both), dis (discordant
    pairs), Spearman's rho, and "split" (the group's keys[0])."""
    if len(x) == 0:
        empty = np.zeros(0)
        return {name: empty for name in ("n", "n0", "n1", "n2", "n3", "dis", "rho")} | {"split": empty.astype(int)}
    code, split = group_codes(keys)
    stats = grouped_stats(orders(x, y), code)
    stats["split"] = split.astype(np.int64)
    return stats


def group_codes(keys: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(each row's group code, each group's ``keys[0]`` value) for groups of rows sharing all
    ``keys``, codes 0..g-1 in lexicographic order of the keys.

    Each key is coded on its own (1-d sorts, any dtype: a uint64 prompt hash is not mixed with an
    int64 split into float64) and the codes are combined pairwise; ``np.unique(..., axis=0)`` on the
    stacked keys gave the same codes about 10x slower.
    """
    uniques, code = np.unique(keys[0], return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    first = np.arange(len(uniques))  # the keys[0] index of each group so far
    for key in keys[1:]:
        values, inner = np.unique(key, return_inverse=True)
        groups, code = np.unique(code * len(values) + inner.reshape(-1), return_inverse=True)
        code = code.reshape(-1).astype(np.int64)
        first = first[groups // len(values)]
    return code, uniques[first]


@dataclass
class Orders:
    """Rows sorted by (x, y) and by y, computed once and shared by every grouping of the rows
    (whole table, each split, each prompt): a grouping then only needs an integer value sort."""

    by_xy: np.ndarray  # row at each position of the (x, y) order (Knight's order)
    by_y: np.ndarray  # row at each position of the y order
    pos_xy: np.ndarray  # each row's position in by_xy
    pos_y: np.ndarray
    x_dense: np.ndarray  # dense rank of x at each position of by_xy
    y_dense: np.ndarray  # dense rank of y at each position of by_y
    y_rank: np.ndarray  # dense rank of y of each row
    bits: int  # bits that hold a position


def orders(x: np.ndarray, y: np.ndarray) -> Orders:
    """Both orders of (x, y) with polars' multi-threaded sorts (two float argsorts in all
    unless x has ties, which cost one more integer argsort)."""
    m = len(x)
    index = np.int32 if m < 2**31 else np.int64
    by_y = _arg_sort(y)
    y_dense = np.cumsum(_starts(y[by_y]), dtype=index)
    y_dense -= 1
    y_rank = _inverse(by_y, y_dense)
    by_xy = _arg_sort(x)
    x_dense = np.cumsum(_starts(x[by_xy]), dtype=index)
    x_dense -= 1
    if m and x_dense[-1] + 1 < m:  # ties in x: order each tie by y
        x_rank = _inverse(by_xy, x_dense)
        y_bits = max(int(y_dense[-1]).bit_length(), 1)
        by_xy = _arg_sort((x_rank.astype(np.int64) << y_bits) | y_rank)
        x_dense = x_rank[by_xy]
    positions = np.arange(m, dtype=index)
    return Orders(
        by_xy=by_xy,
        by_y=by_y,
        pos_xy=_inverse(by_xy, positions),
        pos_y=_inverse(by_y, positions),
        x_dense=x_dense,
        y_dense=y_dense,
        y_rank=y_rank,
        bits=max(int(m - 1).bit_length(), 1),
    )


def _arg_sort(values: np.ndarray) -> np.ndarray:
    return pl.Series(values).arg_sort().to_numpy()


def _inverse(order: np.ndarray, values: np.ndarray, size: int | None = None) -> np.ndarray:
    """``out[order[i]] = values[i]`` (``size`` rows, default ``len(order)``): a value per row
    from a value per sorted position."""
    out = np.empty(len(order) if size is None else size, dtype=values.dtype)
    out[order] = values
    return out


def _starts(values: np.ndarray) -> np.ndarray:
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return starts


def _grouped_order(
    code: np.ndarray, keep: np.ndarray | None, position: np.ndarray, order: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """(code, position) of the kept rows sorted by code, then position: one sort of packed
    int64 values (no argsort), or none for a single code."""
    if code.size and code.max() == code.min():
        positions = np.flatnonzero(keep[order]) if keep is not None else np.arange(len(order))
        return np.full(len(positions), code[0], dtype=np.int64), positions
    if keep is not None:
        code, position = code[keep], position[keep]
    packed = pl.Series((code.astype(np.int64, copy=False) << bits) | position).sort().to_numpy()
    return packed >> bits, packed & ((1 << bits) - 1)


@dataclass
class _Knight:
    """Kept rows of each group in Knight's order (group, x, y), with x-side counts per group."""

    code: np.ndarray  # the codes actually sorted on (made dense when the originals were too wide)
    codes: np.ndarray  # each present group's original code, in order
    group: np.ndarray  # dense group index of each sorted row
    start: np.ndarray  # where each group starts
    rows: np.ndarray  # row at each sorted position
    rx: np.ndarray  # dense x rank at each sorted position
    ry: np.ndarray  # dense y rank at each sorted position
    n: np.ndarray
    n1: np.ndarray  # x ties
    n3: np.ndarray  # x and y ties
    x_avg: np.ndarray  # average x rank (1-based) within the group, at each sorted position


def _knight(orders: Orders, code: np.ndarray, keep: np.ndarray | None) -> _Knight:
    bits = orders.bits
    uniques = None
    if int(code.max()).bit_length() + bits > 63:  # make the codes dense so (code, position) fits in 63 bits
        uniques, code = np.unique(code, return_inverse=True)
        code = code.reshape(-1).astype(np.int64)
    code_x, pos_x = _grouped_order(code, keep, orders.pos_xy, orders.by_xy, bits)
    first_x = _starts(code_x)
    codes = code_x[first_x] if uniques is None else uniques[code_x[first_x]]
    del code_x
    n_groups = len(codes)
    gx, start_x = np.cumsum(first_x) - 1, np.flatnonzero(first_x)
    rows_x = orders.by_xy[pos_x]
    rx = orders.x_dense[pos_x]
    ry = orders.y_rank[rows_x]
    del pos_x
    n = np.bincount(gx, minlength=n_groups).astype(float)
    x_run = first_x | _starts(rx)
    n1, x_avg = _ties_and_average_ranks(gx, x_run, start_x, n_groups)
    n3 = _ties_and_average_ranks(gx, x_run | _starts(ry), start_x, n_groups)[0] if n1.any() else np.zeros(n_groups)
    return _Knight(code, codes, gx, start_x, rows_x, rx, ry, n, n1, n3, x_avg)


def grouped_stats(orders: Orders, code: np.ndarray, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Rank statistics (n, n0, n1, n2, n3, dis, rho; see ``rank_stats``) per group of rows
    sharing ``code`` (int64 >= 0), for the rows in ``keep`` (all when None); one entry per
    code present, in code order, with the codes in "code"."""
    k = _knight(orders, code, keep)
    n_groups = len(k.codes)
    if n_groups > _FEW_GROUPS and k.n.max() <= _SMALL_GROUP:
        n2, y_avg, dis = _small_group_y_stats(k.group, k.ry, n_groups, int(k.n.max()))
    else:
        code_y, pos_y = _grouped_order(k.code, keep, orders.pos_y, orders.by_y, orders.bits)
        first_y = _starts(code_y)
        del code_y
        gy, start_y = np.cumsum(first_y) - 1, np.flatnonzero(first_y)
        y_run = first_y | _starts(orders.y_dense[pos_y])
        n2, y_avg_sorted = _ties_and_average_ranks(gy, y_run, start_y, n_groups)
        rows_y = orders.by_y[pos_y]
        y_avg = _inverse(rows_y, y_avg_sorted, len(orders.by_y))[k.rows]
        if n_groups <= _FEW_GROUPS:
            dis = _discordant_few(k.start, k.rx, k.ry)
        else:  # y ranks restart at 0 in each group, so the counting needs as few bits as the largest group
            y_dense = np.cumsum(y_run) - 1
            y_within = _inverse(rows_y, y_dense - y_dense[start_y][gy], len(orders.by_y))
            dis = _discordant_pairs(k.group, y_within[k.rows], n_groups)
    rho = _pearson_by_group(k.group, k.x_avg, y_avg, k.n, n_groups)
    n = k.n
    return {"n": n, "n0": n * (n - 1) / 2, "n1": k.n1, "n2": n2, "n3": k.n3, "dis": dis, "rho": rho, "code": k.codes}


def x_side_stats(
    orders: Orders, code: np.ndarray, keep: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per group of rows sharing ``code``: n, n1 (x ties), n3 (x and y ties), dis (discordant
    pairs) and "code"; and each row's average x rank (1-based) within its group, NaN for rows
    not in ``keep``. The half of :func:`grouped_stats` that needs no y ranks per group, for
    combining partitions of rows (see ``prefnoise.metrics``)."""
    k = _knight(orders, code, keep)
    n_groups = len(k.codes)
    if n_groups <= _FEW_GROUPS:
        dis = _discordant_few(k.start, k.rx, k.ry)
    else:
        dis = _discordant_pairs(k.group, k.ry.astype(np.int64), n_groups)
    ranks = np.full(len(orders.by_xy), np.nan)
    ranks[k.rows] = k.x_avg
    return {"n": k.n, "n1": k.n1, "n3": k.n3, "dis": dis, "code": k.codes}, ranks


def _small_group_y_stats(
    group: np.ndarray, y: np.ndarray, n_groups: int, largest: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y ties and discordant pairs per group, and each element's average y rank in its group, for
    groups of at most ``largest`` elements in Knight's order: each element is compared with its
    neighbours up to ``largest - 1`` places on, so no second sort is needed."""
    below = np.zeros(len(y))  # others in the group with a smaller y
    equal = np.zeros(len(y))  # others in the group with the same y
    dis = np.zeros(n_groups)
    for d in range(1, largest):
        same = group[d:] == group[:-d]
        earlier, later = y[:-d], y[d:]
        greater = same & (earlier > later)  # x no larger, y larger: discordant (x ties are sorted by y)
        less = same & (earlier < later)
        tie = same & (earlier == later)
        dis += np.bincount(group[:-d], weights=greater, minlength=n_groups)
        below[:-d] += greater
        below[d:] += less
        equal[:-d] += tie
        equal[d:] += tie
    ties = np.bincount(group, weights=equal, minlength=n_groups) / 2
    return ties, 1 + below + equal / 2, dis


def _discordant_few(start: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Discordant pairs per group for a few large groups in Knight's order (group, x, y): scipy's
    compiled Fenwick-tree count when available, else the numpy bit passes."""
    ends = np.append(start[1:], len(rx))
    compiled = _compiled_discordant()
    if compiled is None:
        group = np.repeat(np.arange(len(start)), ends - start)
        return _discordant_pairs(group, ry.astype(np.int64), len(start))
    x, y = rx.astype(np.intp, copy=False), np.add(ry, 1, dtype=np.intp)  # the tree is 1-based
    return np.array([float(compiled(x[a:b], y[a:b])) if b - a > 1 else 0.0 for a, b in zip(start, ends)])


def tau_b(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Kendall's tau-b per group from pair counts: (C - D) / sqrt((n0 - n1)(n0 - n2))."""
    n0, n1, n2, n3, dis = stats["n0"], stats["n1"], stats["n2"], stats["n3"], stats["dis"]
    concordant_minus_discordant = n0 - n1 - n2 + n3 - 2 * dis
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = concordant_minus_discordant / np.sqrt((n0 - n1) * (n0 - n2))
    return np.where((n0 - n1 > 0) & (n0 - n2 > 0), np.clip(tau, -1.0, 1.0), np.nan)


def _ties_and_average_ranks(
    group: np.ndarray, run_start: np.ndarray, group_start: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tied pairs per group, and each sorted element's average rank (1-based) within its group;
    ``group_start`` holds the position where each group begins."""
    if run_start.all():  # no ties: the rank is the position in the group
        ranks = np.arange(1, len(group) + 1, dtype=float)
        ranks -= group_start[group]
        return np.zeros(n_groups), ranks
    starts = np.flatnonzero(run_start)
    lengths = np.diff(np.append(starts, len(run_start)))
    ties = np.bincount(group[starts], weights=lengths * (lengths - 1) / 2.0, minlength=n_groups)
    average = (starts - group_start[group[starts]]) + (lengths + 1) / 2.0
    return ties, np.repeat(average, lengths)


def _pearson_by_group(group: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson correlation of a and b within each group (NaN when either is constant)."""

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=values, minlength=n_groups)

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = total(a) / n, total(b) / n
    da, db = a - mean_a[group], b - mean_b[group]
    return correlation(total(da * db), total(da * da), total(db * db))


def correlation(cov: np.ndarray, var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """Pearson correlation from summed centred products and squares, clipped to [-1, 1]; NaN
    where either variable is constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = cov / np.sqrt(var_a * var_b)
    return np.where((var_a > 0) & (var_b > 0), np.clip(rho, -1.0, 1.0), np.nan)


def _discordant_pairs(group: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, pairs i < j (same group, array order) with y_i > y_j, for ``group`` sorted and
    ``y`` non-negative integers. O(n log max(y)) numpy passes: bit b, most significant first,
    counts the pairs whose y first differ at b; elements are then stably partitioned by b."""
    out = np.zeros(n_groups, dtype=np.float64)
    n = len(y)
    if n < 2 or int(y.max()) == 0:
        return out
    bits = int(y.max()).bit_length()
    if n_groups <= _FEW_GROUPS:
        return _discordant_few_groups(group, y, n_groups, bits)
    key = (group.astype(np.int64) << bits) | y.astype(np.int64)
    index = np.arange(n, dtype=np.int64)
    for b in range(bits - 1, -1, -1):
        prefix = key >> (b + 1)
        starts = np.flatnonzero(np.concatenate(([True], prefix[1:] != prefix[:-1])))
        lengths = np.diff(np.append(starts, n))
        bit = (key >> b) & 1
        ones_excl = np.cumsum(bit) - bit
        ones_at_start = ones_excl[starts]
        ones_in = np.add.reduceat(bit, starts)
        zeros_in = lengths - ones_in
        ones_before_zeros = np.add.reduceat(np.where(bit == 0, ones_excl, 0), starts)
        contribution = ones_before_zeros - zeros_in * ones_at_start
        out += np.bincount(prefix[starts] >> (bits - b - 1), weights=contribution, minlength=n_groups)
        if b == 0:
            break
        start_of = np.repeat(starts, lengths)
        ones_rel = ones_excl - np.repeat(ones_at_start, lengths)
        new_position = np.where(bit == 0, index - ones_rel, start_of + np.repeat(zeros_in, lengths) + ones_rel)
        moved = np.empty_like(key)
        moved[new_position] = key
        key = moved
    return out


def _discordant_few_groups(group: np.ndarray, y: np.ndarray, n_groups: int, bits: int) -> np.ndarray:
    """The same count for a handful of groups, as a wavelet matrix: each level partitions the
    whole array stably by one bit, which keeps elements with equal higher bits contiguous."""
    out = np.zeros(n_groups, dtype=np.float64)
    n = len(y)
    gbits = max(int(n_groups - 1).bit_length(), 0)
    key = (group.astype(np.int64) << bits) | y.astype(np.int64)
    dtype = np.int32 if n < 2**31 else np.int64
    index = np.arange(n, dtype=dtype)
    for b in range(bits + gbits - 1, -1, -1):
        bit = ((key >> b) & 1).astype(dtype)
        ones_excl = np.cumsum(bit, dtype=dtype) - bit
        if b < bits:  # group bits never hold a discordant pair: the groups are sorted
            prefix = key >> (b + 1)
            starts = np.flatnonzero(np.concatenate(([True], prefix[1:] != prefix[:-1])))
            zeros_in = np.diff(np.append(starts, n)) - np.add.reduceat(bit, starts)
            ones_before_zeros = np.add.reduceat(np.where(bit == 0, ones_excl, 0).astype(np.int64), starts)
            contribution = ones_before_zeros - zeros_in * ones_excl[starts].astype(np.int64)
            out += np.bincount(prefix[starts] >> (bits - b - 1), weights=contribution, minlength=n_groups)
        if b == 0:
            break
        n_zeros = n - int(ones_excl[-1] + bit[-1])
        new_position = np.where(bit == 0, index - ones_excl, n_zeros + ones_excl)
        moved = np.empty_like(key)
        moved[new_position] = key
        key = moved
    return out
