"""Label-noise models for preference pairs, as pure functions of (seed, pair_id, columns).

Every model gives each pair a flip probability p; the pair flips when its uniform draw u < p.
The draw is a keyed hash of (seed, model, pair_id), not a stateful RNG walking the rows, so a
pair's fate is the same whatever the batch size, shard split or row order. Each corrupt step of a
file's history draws from its own stream (``NoiseSpec.step``, :func:`corrupt_step`), so corrupting
twice composes independent noise: ε1 then ε2 gives ε1 + ε2 − 2·ε1·ε2 wrong labels. Noise models follow
Nishimori et al. (arXiv 2505.24709, Sec. 3.1) and the instance-dependent variants of their code.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from prefnoise import columns as C
from prefnoise.data import path_dtype, path_expr, resolve_path, score_hint
from prefnoise.errors import PrefnoiseError
from prefnoise.options.corrupt import (  # noqa: F401  (NOISE_MODELS, ORIENTATION_RULES: re-exported)
    NOISE_MODELS,
    ORIENTATION_RULES,
    check_noise_parameters,
    parse_orientation_rule,
)
from prefnoise.options.ranges import OptionError

ALL, POSITIVE, NEGATIVE = "all", "positive", "negative"
_TWO_POW_53 = float(2**53)


@dataclass(frozen=True)
class NoiseSpec:
    """A noise model and its parameters; :meth:`check` validates them against a table schema."""

    kind: str = "symmetric"
    rate: float | None = None  # symmetric
    rate_pos: float | None = None  # asymmetric: positive pairs (as oriented by `by`)
    rate_neg: float | None = None  # asymmetric: the other pairs
    by: str = "longer"  # asymmetric orientation rule
    temperature: float = 1.0  # bt
    max_rate: float = 0.3  # uniform: p ~ U[0, max_rate] per pair
    exact: bool = False
    seed: int = C.DEFAULT_SEED
    force: bool = False
    # Skip (and count in CorruptionStats.dropped) pairs whose score or orientation value is missing
    # or not finite, instead of stopping at the first one.
    drop_invalid: bool = False
    # Position of this corrupt step in the data's provenance: the number of earlier `corrupt` steps
    # (see corrupt_step). Each step draws from its own stream, so repeated corruption composes as
    # independent noise instead of reusing (and XOR-cancelling) the same draws.
    step: int = 0

    def stream(self, name: str) -> str:
        """The draw stream ``name`` of this step: step 0 keeps the historical key, step k > 0 its own."""
        return name if self.step == 0 else f"{name}#step{self.step}"

    def parameters(self) -> dict[str, object]:
        """The parameters this noise model uses (for provenance and summaries)."""
        used = {
            "symmetric": ("rate",),
            "asymmetric": ("rate_pos", "rate_neg", "by"),
            "bt": ("temperature",),
            "uniform": ("max_rate",),
        }.get(self.kind, ())
        step = {"step": self.step} if self.step else {}
        return {"noise": self.kind, **{name: getattr(self, name) for name in used}, "exact": self.exact, **step}

    def check(self, schema: pl.Schema | None = None) -> None:
        """Raise PrefnoiseError for out-of-range parameters or columns the model needs but lacks."""
        try:
            check_noise_parameters(
                self.kind, rate=self.rate, rate_pos=self.rate_pos, rate_neg=self.rate_neg, by=self.by,
                temperature=self.temperature, max_rate=self.max_rate, exact=self.exact, force=self.force,
            )
        except OptionError as error:  # the spec's fields carry the CLI's names
            raise PrefnoiseError(error.as_flag()) from None
        if not isinstance(self.step, int) or self.step < 0:
            raise PrefnoiseError(f"noise step must be a non-negative integer, got {self.step!r}")
        if schema is not None:
            _check_columns(self, schema)


def corrupt_step(history: Iterable[dict[str, object]]) -> int:
    """The step number of a new corruption of data with provenance ``history``: its count of
    earlier ``corrupt`` steps (pass it as ``NoiseSpec(step=...)``).

    Composition rule: steps draw independently, so symmetric noise ε1 then ε2 leaves a label
    wrong with probability ε1 + ε2 − 2·ε1·ε2 (0.2 then 0.4 → 0.44; 0.3 twice → 0.42), and the
    same inputs, seeds and history always give the same output.
    """
    return sum(1 for entry in history if isinstance(entry, dict) and entry.get("command") == "corrupt")


def _parse_rule(rule: str) -> tuple[str, str | None]:
    try:
        return parse_orientation_rule(rule)
    except OptionError as error:
        raise PrefnoiseError(error.as_flag()) from None


def _check_columns(spec: NoiseSpec, schema: pl.Schema) -> None:
    if spec.kind == "bt":
        needed = [C.chosen(C.SCORE), C.rejected(C.SCORE)]
        missing = [c for c in needed if c not in schema]
        if missing:
            raise PrefnoiseError(
                f"--noise bt needs true scores in {' and '.join(needed)}; missing {', '.join(missing)}"
                f"{score_hint(schema)}"
            )
        for column in needed:
            if not schema[column].is_numeric():
                raise PrefnoiseError(
                    f"--noise bt needs numeric true scores; column {column!r} has type {schema[column]}"
                )
    if spec.kind == "asymmetric":
        kind, name = _parse_rule(spec.by)
        if kind == "column":
            dtype = path_dtype(schema, _rule_path(schema, name))  # type: ignore[arg-type]
            if not (dtype == pl.Boolean or dtype.is_integer()):
                hint = ""
                if isinstance(dtype, pl.Struct) and dtype.fields:
                    hint = f"; to use a field inside it give its dotted path, e.g. column:{name}.{dtype.fields[0].name}"
                raise PrefnoiseError(
                    f"--by column:{name} needs a boolean column (true marks a positive pair; integers 0/1 work too); "
                    f"column {name!r} has type {dtype}{hint}"
                )
        if kind == "compare":
            needed = [C.chosen(name), C.rejected(name)]  # type: ignore[arg-type]
            missing = [c for c in needed if c not in schema]
            if missing:
                hint = (
                    "; map true scores kept elsewhere (e.g. struct fields) with --chosen-score-col/--rejected-score-col"
                    " and use compare:score"
                    if name == C.SCORE or "." in name  # type: ignore[operator]
                    else ""
                )
                raise PrefnoiseError(
                    f"--by compare:{name} needs columns {' and '.join(needed)}; missing {', '.join(missing)}{hint}"
                )
            for column in needed:
                if not schema[column].is_numeric():
                    raise PrefnoiseError(
                        f"--by compare:{name} needs numeric {' and '.join(needed)} (positive: chosen's value is "
                        f"larger); column {column!r} has type {schema[column]}"
                    )


def _rule_path(schema: pl.Schema, name: str) -> list[str]:
    """The column (or dotted path into a struct) ``--by column:NAME`` reads."""
    try:
        return resolve_path(schema, name, what=f"read by --by column:{name}")
    except PrefnoiseError as error:
        raise PrefnoiseError(f"--by column:{name}: {error.message}") from None


def _values(frame: pl.DataFrame, column: str) -> pl.Series:
    """The values of ``column``, or of the struct field a dotted ``column`` names."""
    if column in frame.columns:
        return frame[column]
    return frame.select(path_expr(_rule_path(frame.schema, column)).alias(column)).to_series()


def value_columns(spec: NoiseSpec) -> tuple[str, list[str], bool]:
    """The option that reads per-pair values, the columns it reads, and whether they must be finite
    numbers (scores) or only present (an orientation flag); no columns for the other models."""
    if spec.kind == "bt":
        return "--noise bt", [C.chosen(C.SCORE), C.rejected(C.SCORE)], True
    if spec.kind == "asymmetric":
        kind, name = _parse_rule(spec.by)
        if kind == "column":
            return f"--by {spec.by}", [name], False  # type: ignore[list-item]
        if kind == "compare":
            return f"--by {spec.by}", [C.chosen(name), C.rejected(name)], True  # type: ignore[arg-type]
    return "", [], False


def usable_rows(
    frame: pl.DataFrame, spec: NoiseSpec, row_offset: int = 0, name: str | None = None
) -> tuple[pl.DataFrame, dict[str, int]]:
    """``frame`` without the pairs whose values the noise model reads are null, NaN or infinite, and
    the count of those per reason (with ``spec.drop_invalid``); otherwise a PrefnoiseError naming
    the input ``name``, the column and the first such row (1-based, counted from ``row_offset``)."""
    flag, columns, finite = value_columns(spec)
    if not columns or frame.height == 0:
        return frame, {}
    dropped: dict[str, int] = {}
    seen = np.zeros(frame.height, dtype=bool)
    for column in columns:
        values = _values(frame, column)
        bad = values.is_null()
        if finite and values.dtype.is_float():
            bad = bad | ~values.is_finite().fill_null(False)
        mask = bad.to_numpy() & ~seen
        count = int(mask.sum())
        if not count:
            continue
        if not spec.drop_invalid:
            first = int(np.flatnonzero(mask)[0])
            value = values[first]
            what = "null" if value is None else f"{value}"
            raise PrefnoiseError(
                f"{f'{name}: ' if name else ''}{flag}: column {column!r} is {what} at row {row_offset + first + 1} "
                f"(pair_id {frame[C.PAIR_ID][first]}); it needs {'a finite number' if finite else 'a value'} "
                "in every row: fix or remove such rows, or pass --drop-invalid to skip them"
            )
        reason = f"{'null or non-finite' if finite else 'null'} '{column}'"
        dropped[reason] = count
        seen |= mask
    return (frame.filter(pl.Series(~seen)) if seen.any() else frame), dropped


# --------------------------------------------------------------------------- pure pieces


def uniform_draws(pair_ids: Sequence[str] | pl.Series, seed: int, stream: str = "flip") -> np.ndarray:
    """One U[0, 1) number per pair id: a keyed hash of (seed, stream, pair_id), order independent.

    The hash is splitmix64 folded over the id's UTF-8 bytes in little-endian 8-byte words, keyed by
    a blake2b digest of (seed, stream); vectorised with numpy, stable across platforms and versions.
    """
    ids = pl.Series(pair_ids, dtype=pl.String) if not isinstance(pair_ids, pl.Series) else pair_ids
    key = np.uint64(
        int.from_bytes(hashlib.blake2b(f"prefnoise:{seed}:{stream}".encode(), digest_size=8).digest(), "little")
    )
    words, lengths = _utf8_words(ids)
    with np.errstate(over="ignore"):
        state = _splitmix64(key ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
        for j in range(words.shape[1]):
            mixed = _splitmix64(state ^ words[:, j])
            state = np.where(lengths > 8 * j, mixed, state)
    return (state >> np.uint64(11)).astype(np.float64) / _TWO_POW_53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _utf8_words(ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each string's UTF-8 bytes as zero-padded little-endian uint64 words, and the byte lengths."""
    if ids.null_count():
        raise PrefnoiseError("pair_id has null values; fill them or drop the column to recompute ids")
    array = ids.to_arrow().cast(pa.large_string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    n = len(array)
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[array.offset : array.offset + n + 1]
    lengths = np.diff(offsets)
    n_words = int(-(-lengths.max() // 8)) if n else 0
    width = max(n_words, 1) * 8
    if not (n and lengths.sum()):
        return np.zeros((n, width), dtype=np.uint8).view("<u8")[:, :n_words], lengths
    # one gather of each row's first `width` bytes (past the end: zero padding), then zero what is not its own
    text = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
    data = np.concatenate([text, np.zeros(width, np.uint8)])
    columns = np.arange(width, dtype=np.int64)
    padded = data[(offsets[:-1] - offsets[0])[:, None] + columns]
    padded[columns >= lengths[:, None]] = 0
    return padded.view("<u8")[:, :n_words], lengths


def positive_pairs(frame: pl.DataFrame, rule: str) -> np.ndarray:
    """Which pairs the orientation rule calls positive (``longer``, ``column:NAME``, ``compare:NAME``)."""
    kind, name = _parse_rule(rule)
    if kind == "longer":
        expr = pl.col(C.CHOSEN).str.len_chars() > pl.col(C.REJECTED).str.len_chars()
    elif kind == "column":
        expr = path_expr(_rule_path(frame.schema, name)).cast(pl.Boolean)  # type: ignore[arg-type]
    else:
        expr = pl.col(C.chosen(name)) > pl.col(C.rejected(name))  # type: ignore[arg-type]
    return frame.select(expr.fill_null(False)).to_series().to_numpy().astype(bool)


def bradley_terry_flip_probability(
    chosen_score: np.ndarray, rejected_score: np.ndarray, temperature: float
) -> np.ndarray:
    """P(a Bradley–Terry annotator prefers the rejected response) = σ(−(s_c − s_r)/T)."""
    margin = (np.asarray(chosen_score, dtype=np.float64) - np.asarray(rejected_score, dtype=np.float64)) / temperature
    return 0.5 * (1.0 - np.tanh(margin / 2.0))  # σ(−m), stable for any |m|


def flip_groups(frame: pl.DataFrame, spec: NoiseSpec) -> np.ndarray:
    """The summary group of each pair: 'positive'/'negative' for asymmetric noise, else 'all'."""
    if spec.kind == "asymmetric":
        return np.where(positive_pairs(frame, spec.by), POSITIVE, NEGATIVE)
    return np.full(frame.height, ALL)


def flip_probability(frame: pl.DataFrame, spec: NoiseSpec) -> np.ndarray:
    """Each pair's probability of being flipped under ``spec``."""
    if spec.kind == "symmetric":
        return np.full(frame.height, float(spec.rate))  # type: ignore[arg-type]
    if spec.kind == "asymmetric":
        return np.where(positive_pairs(frame, spec.by), spec.rate_pos, spec.rate_neg).astype(np.float64)
    if spec.kind == "bt":
        scores = frame.select(C.chosen(C.SCORE), C.rejected(C.SCORE)).cast(pl.Float64)
        if scores.null_count().sum_horizontal().item():
            raise PrefnoiseError("--noise bt: chosen_score/rejected_score contain nulls; fill or drop those rows")
        chosen, rejected = scores[:, 0].to_numpy(), scores[:, 1].to_numpy()
        if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
            raise PrefnoiseError("--noise bt: chosen_score/rejected_score contain NaN or inf; fix or drop those rows")
        return bradley_terry_flip_probability(chosen, rejected, spec.temperature)
    # uniform: each pair draws its own rate from U[0, max_rate] (instance-dependent noise)
    return spec.max_rate * uniform_draws(frame[C.PAIR_ID], spec.seed, stream=spec.stream("uniform-rate"))


def flip_mask(
    frame: pl.DataFrame,
    spec: NoiseSpec,
    thresholds: dict[str, float] | None = None,
    *,
    probability: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Which pairs to flip: u < p, or with ``--exact`` the pairs whose draw is within their group's threshold.

    ``probability`` / ``groups`` may pass in what the caller already computed for this frame.
    """
    draws = uniform_draws(frame[C.PAIR_ID], spec.seed, stream=spec.stream(spec.kind))
    if not spec.exact:
        return draws < (flip_probability(frame, spec) if probability is None else probability)
    if thresholds is None:
        raise ValueError("exact flips need thresholds from exact_thresholds()")
    groups = flip_groups(frame, spec) if groups is None else groups
    limit = np.full(len(groups), -1.0)
    for group, threshold in thresholds.items():
        limit[groups == group] = threshold
    return draws <= limit


def exact_thresholds(batches: Iterable[pl.DataFrame], spec: NoiseSpec, *, name: str | None = None) -> dict[str, float]:
    """Per group, the largest draw among the round(rate·n) smallest: flipping u <= it flips exactly that many."""
    draws: dict[str, list[np.ndarray]] = {}
    offset = 0
    for frame in batches:
        for group, values in exact_draws(frame, spec, offset, name).items():
            draws.setdefault(group, []).append(values)
        offset += frame.height
    return thresholds_of_draws(draws, spec)


def exact_draws(
    frame: pl.DataFrame, spec: NoiseSpec, row_offset: int = 0, name: str | None = None
) -> dict[str, np.ndarray]:
    """The draws of ``frame``'s usable pairs by summary group (one batch's share of :func:`exact_thresholds`)."""
    frame, _ = usable_rows(frame, spec, row_offset, name)  # counted by corrupt_batches, on the second pass
    u = uniform_draws(frame[C.PAIR_ID], spec.seed, stream=spec.stream(spec.kind))
    groups = flip_groups(frame, spec)
    return {str(group): u[groups == group] for group in np.unique(groups)}


def thresholds_of_draws(draws: dict[str, list[np.ndarray]], spec: NoiseSpec) -> dict[str, float]:
    """Per group, the exact-flip threshold of all its draws (listed batch by batch)."""
    rates = {ALL: spec.rate, POSITIVE: spec.rate_pos, NEGATIVE: spec.rate_neg}
    thresholds = {}
    for group, parts in draws.items():
        values = np.concatenate(parts)
        k = int(round(float(rates[group]) * len(values)))  # type: ignore[arg-type]
        thresholds[group] = float(np.partition(values, k - 1)[k - 1]) if k > 0 else -1.0
    return thresholds


def swap_responses(frame: pl.DataFrame, mask: np.ndarray | pl.Series) -> pl.DataFrame:
    """Swap chosen/rejected and every chosen_<f>/rejected_<f> (and <f>_chosen/<f>_rejected) where
    ``mask``; XOR it into ``flipped``.

    Struct columns (e.g. UltraFeedback's ``metadata``) have their per-response fields swapped too,
    at any nesting depth: ``chosen_X``/``rejected_X`` and ``X_chosen``/``X_rejected`` (the rule of
    :func:`prefnoise.columns.struct_partner`), so a score keeps describing its own response.
    """
    flip = pl.Series("__flip", mask, dtype=pl.Boolean)
    frame = frame.with_columns(flip)
    swaps = []
    pairs = C.response_column_pairs(frame.columns)
    for chosen_col, rejected_col in [(C.CHOSEN, C.REJECTED), *pairs]:
        swaps.append(pl.when("__flip").then(pl.col(rejected_col)).otherwise(pl.col(chosen_col)).alias(chosen_col))
        swaps.append(pl.when("__flip").then(pl.col(chosen_col)).otherwise(pl.col(rejected_col)).alias(rejected_col))
    paired = {name for pair in pairs for name in pair}
    for column, dtype in frame.schema.items():
        if isinstance(dtype, pl.Struct) and column not in paired:
            swapped = _swap_struct_fields(pl.col(column), dtype, pl.col("__flip"))
            if swapped is not None:
                swaps.append(swapped.alias(column))
    previous = pl.col(C.FLIPPED).fill_null(False) if C.FLIPPED in frame.columns else pl.lit(False)
    swaps.append((previous ^ pl.col("__flip")).alias(C.FLIPPED))
    return frame.with_columns(swaps).drop("__flip")


def _swap_struct_fields(value: pl.Expr, dtype: pl.Struct, flip: pl.Expr) -> pl.Expr | None:
    """``value`` (a struct) with its per-response fields swapped where ``flip`` (see
    :func:`prefnoise.columns.struct_partner`), nested structs included; None when it has none."""
    names = [f.name for f in dtype.fields]
    fields, changed = [], False
    for item in dtype.fields:
        own = value.struct.field(item.name)
        partner = C.struct_partner(item.name, names)
        if partner is not None:
            fields.append(pl.when(flip).then(value.struct.field(partner)).otherwise(own).alias(item.name))
            changed = True
            continue
        inner = _swap_struct_fields(own, item.dtype, flip) if isinstance(item.dtype, pl.Struct) else None
        changed |= inner is not None
        fields.append(own.alias(item.name) if inner is None else inner.alias(item.name))
    if not changed:
        return None
    return pl.when(value.is_null()).then(None).otherwise(pl.struct(fields))


# --------------------------------------------------------------------------- streaming corrupt


@dataclass
class GroupCount:
    """Rows and flips of one summary group."""

    rows: int = 0
    flips: int = 0
    expected_flips: float = 0.0

    @property
    def rate(self) -> float:
        """Realized flip rate."""
        return self.flips / self.rows if self.rows else 0.0

    def interval(self, z: float = 1.959964) -> tuple[float, float]:
        """Wilson 95% interval of the realized rate."""
        return wilson_interval(self.flips, self.rows, z)


@dataclass
class CorruptionStats:
    """Counts accumulated while corrupting, per summary group."""

    groups: dict[str, GroupCount] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # pairs skipped for unusable values (drop_invalid)

    @property
    def rows(self) -> int:
        """Rows processed."""
        return sum(g.rows for g in self.groups.values())

    @property
    def flips(self) -> int:
        """Pairs flipped."""
        return sum(g.flips for g in self.groups.values())

    def add(self, groups: np.ndarray, mask: np.ndarray, probability: np.ndarray) -> None:
        """Accumulate one batch."""
        for group in np.unique(groups):
            sel = groups == group
            count = self.groups.setdefault(str(group), GroupCount())
            count.rows += int(sel.sum())
            count.flips += int(mask[sel].sum())
            count.expected_flips += float(probability[sel].sum())

    def merge(self, part: CorruptionStats) -> None:
        """Add another run's counts (a block corrupted elsewhere), in the order :meth:`add` adds a batch's."""
        for reason, count in part.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        for group, count in part.groups.items():
            into = self.groups.setdefault(group, GroupCount())
            into.rows += count.rows
            into.flips += count.flips
            into.expected_flips += count.expected_flips

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "rows": self.rows,
            "flips": self.flips,
            "rate": self.flips / self.rows if self.rows else 0.0,
            "groups": {
                name: {
                    "rows": g.rows,
                    "flips": g.flips,
                    "rate": g.rate,
                    "ci95": list(g.interval()),
                    "expected_rate": g.expected_flips / g.rows if g.rows else 0.0,
                }
                for name, g in sorted(self.groups.items())
            },
        }


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def corrupt_batches(
    batches: Iterable[pl.DataFrame],
    spec: NoiseSpec,
    *,
    stats: CorruptionStats | None = None,
    thresholds: dict[str, float] | None = None,
    on_progress: Callable[[int], None] | None = None,
    name: str | None = None,
    row_offset: int = 0,
) -> Iterator[pl.DataFrame]:
    """Yield each batch with the pairs chosen by ``spec`` flipped; counts go into ``stats``.

    Pairs whose score (or orientation value) is null, NaN or infinite stop the run with an error
    naming the input (``name``), the column and the row, or with ``spec.drop_invalid`` are left out
    and counted in ``stats.dropped`` (rows are counted from ``row_offset``, the rows before the first batch)."""
    offset = row_offset
    for frame in batches:
        height = frame.height
        frame, dropped = usable_rows(frame, spec, offset, name)
        offset += height
        if stats is not None:
            for reason, count in dropped.items():
                stats.dropped[reason] = stats.dropped.get(reason, 0) + count
        if frame.height == 0:
            if on_progress is not None:
                on_progress(height)
            continue
        probability = flip_probability(frame, spec)
        groups = flip_groups(frame, spec) if stats is not None or spec.exact else None
        mask = flip_mask(frame, spec, thresholds, probability=probability, groups=groups)
        if stats is not None:
            stats.add(groups, mask, probability)
        yield swap_responses(frame, mask)
        if on_progress is not None:
            on_progress(height)


def corrupt_frame(frame: pl.DataFrame, spec: NoiseSpec) -> tuple[pl.DataFrame, CorruptionStats]:
    """Corrupt an in-memory canonical table; return it and the flip counts."""
    spec.check(frame.schema)
    stats = CorruptionStats()
    thresholds = exact_thresholds([frame], spec) if spec.exact else None
    out = next(corrupt_batches([frame], spec, stats=stats, thresholds=thresholds))
    return out, stats


def judge_flip_probability(
    true_margin: np.ndarray, temperature: float, shorter_is_better: np.ndarray | None = None, length_bias: float = 0.0
) -> np.ndarray:
    """A judge's chance of preferring the worse response: σ(−|Δ|/T) (1/2 on a tie, falling as the true margin Δ
    grows: instance-dependent noise), plus ``length_bias`` on the pairs where the better response is the shorter
    one (a judge that prefers the longer answer); capped at 1."""
    close = bradley_terry_flip_probability(np.abs(np.asarray(true_margin, dtype=np.float64)), 0.0, temperature)
    if shorter_is_better is None:
        return close
    return np.minimum(close + length_bias * np.asarray(shorter_is_better, dtype=bool), 1.0)
