"""The streaming rank report: one pass over the input rows, then passes over buckets.

:class:`ReportBuilder` counts each batch of projected rows (pair outcomes, worst-pair candidates)
and sends its responses to buckets by a hash of their prompt; each prompt bucket then gives the
per-prompt statistics (:class:`~prefnoise.metrics.totals.PromptTotals`) and, when the table does not
fit in one bucket, sends its responses on to buckets by ranges of the true reward for
:class:`~prefnoise.metrics.global_ranks.GlobalRanks`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics.agreement import NO_PAIR, grow, outcome_index, pair_outcome, signed_margin
from prefnoise.metrics.global_ranks import GlobalRanks, cut_points, value_bucket
from prefnoise.metrics.names import PRED_COL, PROMPT_COL, TRUE_COL
from prefnoise.metrics.rankstats import grouped_stats, orders
from prefnoise.metrics.results import RankMetrics, RankReport
from prefnoise.metrics.spill import Buckets
from prefnoise.metrics.tables import finite_rows
from prefnoise.metrics.totals import PromptTotals, dense_codes, metrics_per_split

_SAMPLE = 200_000  # responses sampled to choose the reward ranges of the buckets

Bucket = dict[str, np.ndarray] | pl.DataFrame  # one prompt bucket's fields
MapBuckets = Callable[[Callable[[Any, Any], Any], Iterable[dict[str, np.ndarray]]], Iterable[Any]]


def _first_skipped(batch: pl.DataFrame, before: int, sources: dict[str, str]) -> tuple[int, str, str] | None:
    """(row, 1-based after ``before`` rows; its input column, by ``sources``; what it holds) of the batch's
    first row with a null, or a NaN or infinite float; None when there is none."""
    first: tuple[int, str, str] | None = None
    for column, dtype in batch.schema.items():
        values = batch[column]
        bad = (values.is_null() | ~values.is_finite()) if dtype.is_float() else values.is_null()
        hits = bad.arg_true()
        if hits.len() and (first is None or before + int(hits[0]) + 1 < first[0]):
            first = (before + int(hits[0]) + 1, sources.get(column, column), _held(values[int(hits[0])]))
    return first


def _held(value: Any) -> str:
    """A skipped value as a message says it: null, nan, inf or -inf."""
    if value is None:
        return "a missing value (null)"
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def _map_here(work: Callable[[Any, Any], Any], buckets: Iterable[dict[str, np.ndarray]]) -> Iterator[Any]:
    """``work`` of each bucket in this process, in order (the local engine)."""
    for bucket in buckets:
        yield work(bucket, None)


class _SplitCodes:
    """Codes for one split column's values in order of first appearance (sorted at the end)."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.labels: list[Any] = [None] if name is None else []
        self._code: dict[Any, int] = {}

    def encode(self, batch: pl.DataFrame) -> np.ndarray:
        """Each row's code for its value of the column (new values get the next codes)."""
        if self.name is None:
            return np.zeros(batch.height, dtype=np.int32)
        values = batch[self.name]
        for value in values.unique(maintain_order=True).to_list():
            if value not in self._code:
                self._code[value] = len(self.labels)
                self.labels.append(value)
        return values.replace_strict(self._code, return_dtype=pl.Int32).to_numpy()

    def sorted_codes(self) -> np.ndarray:
        """The codes in the order of their sorted labels."""
        return np.array(sorted(range(len(self.labels)), key=lambda code: self.labels[code]), dtype=np.int64)


class _Progress:
    """Percentage points of a report, stage by stage (each stage has a weight)."""

    def __init__(self, callback: Callable[[int], None] | None, weights: Sequence[int]) -> None:
        self.callback, self.weights = callback, list(weights)
        self.sent = 0

    def at(self, stage: int, fraction: float) -> None:
        """Report progress up to ``fraction`` of ``stage``."""
        if self.callback is None:
            return
        target = round(sum(self.weights[:stage]) + self.weights[stage] * min(fraction, 1.0))
        if target > self.sent:
            self.callback(target - self.sent)
            self.sent = target


class ReportBuilder:
    """One report's state: counts from the streamed rows, the buckets, the statistics per split
    column (index 0 is the whole table, then each split column; codes per column as read)."""

    def __init__(
        self,
        layout: str,
        has_true: bool,
        splits: list[str],
        worst: int,
        rows: int,
        memory_responses: int,
        temp_dir: str | Path | None,
        on_progress: Callable[[int], None] | None,
        map_buckets: MapBuckets | None = None,
        min_buckets: int = 1,
        *,
        name: str = "data",
        sources: dict[str, str] | None = None,
    ) -> None:
        """``map_buckets(work, buckets)``: ``work(bucket, None)`` of each prompt bucket, in bucket order
        (default: here, one after another; an engine runs them on its workers); ``min_buckets``: cut the
        table into at least that many prompt buckets (so an engine's workers each get some). ``name``: the
        input in messages; ``sources``: each projected column's column in the input (messages name it)."""
        self.map_buckets = map_buckets or _map_here
        self.name, self.sources = name, sources or {}
        self.first_skipped: tuple[int, str, str] | None = None  # (row, 1-based; column; what it holds)
        self.layout, self.has_true, self.worst, self.rows_expected = layout, has_true, worst, rows
        self.temp_dir, self.memory_responses = temp_dir, memory_responses
        self.responses_expected = rows * (2 if layout == "pairs" and has_true else 1)
        self.n_buckets = n_buckets = max(1, min_buckets, math.ceil(self.responses_expected / memory_responses))
        self.coders = [_SplitCodes(None)] + [_SplitCodes(name) for name in splits]
        self.columns = range(len(self.coders))
        self.rows = [np.zeros(0, dtype=np.int64) for _ in self.columns]
        self.cells = [np.zeros(0, dtype=np.int64) for _ in self.columns]  # pair outcomes: code * 4 + outcome
        self.dropped = self.rows_read = self.clean_rows = 0
        self.worst_frames: list[pl.DataFrame] = []
        self.samples: dict[str, list[np.ndarray]] = {"x": [], "y": []}
        self.stack = ExitStack()
        fields = [("prompt", "u8")] + [(f"c{j}", "i4") for j in self.columns if j]
        if layout == "pairs":
            fields += [("out", "i1")]  # the pair's outcome index (on its chosen side; NO_PAIR elsewhere)
        if not has_true:
            fields += [("ok", "?")]
        elif layout == "pairs":
            fields += [("x", "f8"), ("y", "f8"), ("text", "u8"), ("order", "i8")]
        else:
            fields += [("x", "f8"), ("y", "f8"), ("order", "i8")]
        self.prompt_buckets = self.stack.enter_context(Buckets(fields, n_buckets, temp_dir))
        weights = (40, 60) if not has_true or n_buckets == 1 else (35, 35, 15, 15)
        self.progress = _Progress(on_progress, weights)

    def __enter__(self) -> ReportBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # -- pass 1: the input rows

    def add_rows(self, batch: pl.DataFrame) -> None:
        """Count one batch of projected rows and send its responses to the prompt buckets."""
        self.rows_read += batch.height
        # One rule for the rewards: a row with a null, NaN or infinite value is skipped and counted.
        clean = batch.drop_nulls()
        floats = [name for name, dtype in clean.schema.items() if dtype.is_float()]
        if floats:
            clean = clean.filter(finite_rows(*floats))
        if clean.height < batch.height and self.first_skipped is None:
            self.first_skipped = _first_skipped(batch, self.rows_read - batch.height, self.sources)
        self.dropped += batch.height - clean.height
        n = clean.height
        if n:
            codes = [coder.encode(clean) for coder in self.coders]
            for j in self.columns:
                self.rows[j] = grow(self.rows[j], np.bincount(codes[j]))
            prompt = clean[PROMPT_COL].to_numpy()
            bucket = (prompt % np.uint64(self.n_buckets)).astype(np.int64) if self.n_buckets > 1 else 0
            if self.layout == "pairs":
                self._add_pairs(clean, prompt, bucket, codes)
            else:
                self._add_long(clean, prompt, bucket, codes)
            self.clean_rows += n
        self.progress.at(0, self.rows_read / max(self.rows_expected, 1))

    def _add_pairs(self, clean: pl.DataFrame, prompt: np.ndarray, bucket: Any, codes: list[np.ndarray]) -> None:
        true_margin = pl.col("_tc") - pl.col("_tr") if self.has_true else pl.lit(1.0)
        outcome = clean.select(pair_outcome(pl.col("_pc") - pl.col("_pr"), true_margin)).to_series()
        index = outcome_index(outcome)
        for j in self.columns:
            self.cells[j] = grow(self.cells[j], np.bincount(codes[j] * 4 + index))
        if self.worst:
            self._add_worst_pairs(clean, true_margin)
        split_codes = {f"c{j}": codes[j] for j in self.columns if j}
        if not self.has_true:
            self.prompt_buckets.add({"prompt": prompt, "ok": index == 0, "out": index, **split_codes}, bucket)
            return
        x = np.concatenate([clean["_tc"].to_numpy(), clean["_tr"].to_numpy()])
        y = np.concatenate([clean["_pc"].to_numpy(), clean["_pr"].to_numpy()])
        row = np.arange(self.clean_rows, self.clean_rows + clean.height, dtype=np.int64)
        columns = {
            "prompt": np.concatenate([prompt, prompt]),
            "x": x,
            "y": y,
            "text": np.concatenate([clean["_hc"].to_numpy(), clean["_hr"].to_numpy()]),
            "order": np.concatenate([row, row | (1 << 40)]),  # every chosen side, then every rejected side
            "out": np.concatenate([index, np.full(len(index), NO_PAIR)]),
            **{name: np.concatenate([code, code]) for name, code in split_codes.items()},
        }
        self.prompt_buckets.add(columns, np.concatenate([bucket, bucket]) if self.n_buckets > 1 else 0)
        self._sample(x, y)

    def _add_long(self, clean: pl.DataFrame, prompt: np.ndarray, bucket: Any, codes: list[np.ndarray]) -> None:
        x, y = clean[TRUE_COL].to_numpy(), clean[PRED_COL].to_numpy()
        columns = {"prompt": prompt, "x": x, "y": y, "order": clean["_row"].to_numpy()}
        self.prompt_buckets.add(columns | {f"c{j}": codes[j] for j in self.columns if j}, bucket)
        self._sample(x, y)

    def _sample(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.n_buckets > 1:
            step = max(1, self.responses_expected // _SAMPLE)
            self.samples["x"].append(x[::step].copy())  # a copy: a view would keep the whole batch alive
            self.samples["y"].append(y[::step].copy())

    def _add_worst_pairs(self, clean: pl.DataFrame, true_margin: pl.Expr) -> None:
        frame = clean.select(
            pl.col("_id").alias(C.PAIR_ID),
            (pl.col("_pc") - pl.col("_pr")).alias("pred_margin"),
            true_margin.alias("true_margin"),
        )
        self.worst_frames.append(_worst(frame, self.worst))

    def _nothing_to_compare(self) -> str:
        """The one-line error of a table without a single usable row, naming the first skipped one."""
        message = f"{self.name}: no rows with both a predicted and a reference reward to compare"
        if self.first_skipped is None:
            return f"{message} (the table has no rows)"
        row, column, what = self.first_skipped
        return (f"{message}: all {self.rows_read:,} rows were skipped, the first at row {row}, whose column "
                f"{column!r} holds {what}; every reward must be a finite number")

    # -- passes 2 to 4 and the report

    def report(self, *, pred: str, true: str | None, n_boot: int, seed: int) -> RankReport:
        """Finish the passes over the buckets and assemble the report."""
        if self.clean_rows == 0:
            raise PrefnoiseError(self._nothing_to_compare())
        sizes = [len(coder.labels) for coder in self.coders]
        per_prompt = PromptTotals(sizes)
        global_stats: list[dict[str, np.ndarray]] | None = None
        if not self.has_true:
            self._prompt_pass_labels(per_prompt, sizes)
        else:
            global_stats = self._prompt_pass(per_prompt, sizes)
        overall = None
        splits: dict[str, dict[str, RankMetrics]] = {}
        for j, coder in zip(self.columns, self.coders, strict=True):
            order = coder.sorted_codes()
            # Both layouts resample prompts (clusters): pairs of one prompt share its responses and
            # are not independent, so a bootstrap over pairs would be far too narrow.
            agreements = per_prompt.agreements(j, order, n_boot, seed, pairs=self.layout == "pairs")
            metrics = metrics_per_split(
                grow(np.zeros(sizes[j], dtype=np.int64), self.rows[j])[order],
                agreements,
                per_prompt.preservations(j, order),
                None if global_stats is None else per_prompt.means(j, order),
                None if global_stats is None else {name: v[order] for name, v in global_stats[j].items()},
            )
            if j == 0:
                overall = metrics[0]
            else:
                splits[str(coder.name)] = {str(coder.labels[code]): m for code, m in zip(order, metrics, strict=True)}
        assert overall is not None
        worst = pl.concat(self.worst_frames) if self.worst_frames else None
        clusters = per_prompt.clusters(0, self.layout == "pairs")
        return RankReport(
            interval=f"cluster bootstrap over {clusters} prompts" if n_boot > 0 else "none (n_boot = 0)",
            layout=self.layout,
            reference="score" if self.has_true else "labels",
            pred=pred,
            true=true,
            overall=overall,
            splits=splits,
            worst=[] if worst is None else _worst(worst, self.worst).to_dicts(),
            dropped_rows=self.dropped,
            n_boot=n_boot,
            seed=seed,
        )

    def _prompt_pass_labels(self, totals: PromptTotals, sizes: list[int]) -> None:
        """Labels as the reference: a prompt is preserved when all of its pairs are ranked right."""
        for i in range(self.n_buckets):
            rec = self.prompt_buckets.read(i)
            if len(rec["prompt"]):
                prompt = dense_codes(rec["prompt"])
                for j in self.columns:
                    key = prompt * sizes[j] + (rec[f"c{j}"] if j else 0)
                    groups, group = np.unique(key, return_inverse=True)
                    wrong = np.bincount(group.reshape(-1), weights=(~rec["ok"]).astype(float), minlength=len(groups))
                    totals.add_flags(j, groups % sizes[j], wrong == 0, np.ones(len(groups), dtype=bool))
                    totals.add_pair_outcomes(j, key, rec["out"], sizes[j])
            self.progress.at(1, (i + 1) / self.n_buckets)

    def _prompt_pass(self, totals: PromptTotals, sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """Per-prompt statistics bucket by bucket (each bucket's partial statistics, computed by
        :func:`prompt_bucket_stats` here or on the engine's workers, are added in bucket order);
        returns the statistics over all responses."""
        one_bucket = self.n_buckets == 1
        x_bounds = y_bounds = np.zeros(0)
        if not one_bucket:
            x_bounds = cut_points(np.concatenate(self.samples["x"]), self.n_buckets)
            y_bounds = cut_points(np.concatenate(self.samples["y"]), self.n_buckets)
        fields = [("x", "f8"), ("y", "f8")] + [(f"c{j}", "i4") for j in self.columns if j]
        fields += [(f"k{j}", "?") for j in self.columns]
        x_buckets = self.stack.enter_context(Buckets(fields, 2 * len(x_bounds) + 1, self.temp_dir))
        settings = BucketSettings(tuple(sizes), self.layout, self.worst, one_bucket)
        buckets = (rec for rec in map(self.prompt_buckets.read, range(self.n_buckets)) if len(rec["prompt"]))
        result: list[dict[str, np.ndarray]] = []
        done = 0
        for part in self.map_buckets(functools.partial(prompt_bucket_stats, settings=settings), buckets):
            totals.merge(part.totals)
            self.worst_frames += part.worst
            if one_bucket:
                result = part.global_stats
            else:
                x_buckets.add(part.columns, value_bucket(x_bounds, part.columns["x"]))
            done += 1
            self.progress.at(1, done / self.n_buckets)
        self.prompt_buckets.close()
        if one_bucket:
            return result or [_empty_stats(size) for size in sizes]
        return GlobalRanks(
            sizes,
            x_bounds,
            y_bounds,
            chunk=self.memory_responses,
            temp_dir=self.temp_dir,
            stack=self.stack,
            progress=lambda stage, fraction: self.progress.at(2 + stage, fraction),
        ).run(x_buckets)


@dataclass(frozen=True)
class BucketSettings:
    """What :func:`prompt_bucket_stats` needs besides a bucket: codes per split column, the layout,
    how many worst pairs to keep, and whether the bucket is the whole table."""

    sizes: tuple[int, ...]
    layout: str
    worst: int
    whole_table: bool


@dataclass
class BucketStats:
    """One prompt bucket's partial statistics: per-prompt totals (summed over buckets by
    :meth:`PromptTotals.merge`), long-table worst-pair candidates, and either the statistics over all
    responses (``global_stats``, when the bucket is the whole table) or the kept responses with their
    codes (``columns``, for :class:`GlobalRanks`)."""

    totals: PromptTotals
    worst: list[pl.DataFrame]
    global_stats: list[dict[str, np.ndarray]]
    columns: dict[str, np.ndarray]


def prompt_bucket_stats(bucket: Bucket, info: Any = None, *, settings: BucketSettings) -> BucketStats:
    """The partial statistics of one prompt bucket (every response of its prompts; ``bucket`` holds the
    bucket's fields, as arrays or a frame's columns). A pure function of the bucket, so buckets may run
    anywhere and in any order; ``info`` (an engine's block position) is not needed."""
    rec = {name: np.asarray(bucket[name]) for name in (bucket if isinstance(bucket, dict) else bucket.columns)}
    sizes = list(settings.sizes)
    columns = range(len(sizes))
    totals = PromptTotals(sizes)
    prompt = dense_codes(rec["prompt"])
    first = first_rows(prompt, rec["text"]) if "text" in rec else None
    if first is not None:  # "first" means first in the table: put the rows back in table order
        order = np.argsort(rec["order"], kind="stable")
        rec = {name: values[order] for name, values in rec.items()}
        prompt = prompt[order]
        first = first_rows(prompt, rec["text"])
    codes = [rec[f"c{j}"].astype(np.int64) if j else np.zeros(len(prompt), dtype=np.int64) for j in columns]
    keeps: list[np.ndarray | None] = []
    ranked = orders(rec["x"], rec["y"])
    for j in columns:
        group = prompt * sizes[j] + codes[j]
        keep = first if j == 0 or first is None else first_rows(group, rec["text"])
        keeps.append(keep)
        stats = grouped_stats(ranked, group, keep)
        stats["split"] = stats["code"] % sizes[j]
        totals.add_prompts(j, stats, sizes[j])
        if "out" in rec:
            totals.add_pair_outcomes(j, group, rec["out"], sizes[j])
    worst = [_worst(_long_pairs(rec), settings.worst)] if settings.worst and settings.layout == "long" else []
    if settings.whole_table:
        global_stats = []
        for j in columns:
            stats = grouped_stats(ranked, codes[j], keeps[j])
            global_stats.append({n: _spread(v, stats["code"], sizes[j]) for n, v in stats.items() if n != "code"})
        return BucketStats(totals, worst, global_stats, {})
    kept = {"x": rec["x"], "y": rec["y"]} | {f"c{j}": codes[j] for j in columns if j}
    kept |= {f"k{j}": np.ones(len(rec["x"]), bool) if keeps[j] is None else keeps[j] for j in columns}
    return BucketStats(totals, worst, [], kept)


def _spread(values: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """``values`` (one per present code) spread over all ``size`` codes, zero elsewhere."""
    out = np.zeros(size)
    out[codes] = values
    return out


def _empty_stats(size: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(size) for name in ("n", "n0", "n1", "n2", "n3", "dis", "rho")}


def first_rows(group: np.ndarray, text: np.ndarray) -> np.ndarray | None:
    """Mask of the rows whose (group, text hash) no earlier row has; None when every row is new
    (checked first with one value sort, much cheaper than the hash-based dedupe)."""
    shift = int(group.max()).bit_length()
    if shift > 32:
        keys = pl.DataFrame({"group": group, "text": text}).select(pl.struct("group", "text")).to_series()
    else:  # the group in the high bits, the text hash's top (64 - shift) bits below it
        high = group.astype(np.uint64) << np.uint64(64 - shift) if shift else np.uint64(0)
        keys = pl.Series(high | (text >> np.uint64(shift)))
    if keys.dtype != pl.Struct:
        ordered = keys.sort().to_numpy()
        if not (ordered[1:] == ordered[:-1]).any():
            return None
    first = keys.is_first_distinct().to_numpy()
    return None if first.all() else first


def _worst(frame: pl.DataFrame, k: int) -> pl.DataFrame:
    """The ``k`` rows of (id, pred_margin, true_margin[, signed_margin]) ranked most confidently
    wrong: most negative signed margin first, truth ties left out, ids breaking ties."""
    if "signed_margin" not in frame.columns:
        frame = frame.filter(pl.col("true_margin") != 0).with_columns(
            signed_margin(pl.col("pred_margin"), pl.col("true_margin")).alias("signed_margin")
        )
    return frame.sort("signed_margin", frame.columns[0]).head(k)


def _long_pairs(rec: dict[str, np.ndarray]) -> pl.DataFrame:
    """Every (better, worse) pair of responses under one prompt of a long-table bucket, named
    by their input rows."""
    columns = {PROMPT_COL: rec["prompt"], TRUE_COL: rec["x"], PRED_COL: rec["y"], "_row": rec["order"]}
    rows = pl.DataFrame(columns).lazy()
    return (
        rows.join(rows, on=PROMPT_COL, suffix="_b")
        .filter(pl.col(TRUE_COL) > pl.col(f"{TRUE_COL}_b"))
        .select(
            pl.format("{}>{}", "_row", "_row_b").alias("rows"),
            (pl.col(PRED_COL) - pl.col(f"{PRED_COL}_b")).alias("pred_margin"),
            (pl.col(TRUE_COL) - pl.col(f"{TRUE_COL}_b")).alias("true_margin"),
        )
        .collect()
    )
