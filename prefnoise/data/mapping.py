"""Which input columns become the canonical ones: the :class:`ColumnMap`, dotted paths into struct
columns, and the true-score columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the prompt, the two responses and (optionally) their true scores.

    Each entry is a column name or a dotted path into struct columns (``metadata.score_chosen``);
    a column whose own name contains the dot wins over a path. A mapped column moves to its
    canonical name (``prompt``, ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``): a
    top-level column is renamed, a struct field is taken out of its struct, so no stale copy is left
    behind to disagree with the canonical column after a flip.

    True scores whose names pair them with their response (``score_chosen``/``score_rejected``,
    ``chosen_rating``/``rejected_rating``, at the top level or side by side in one struct) are the
    exception: they swap with their response on a flip, so they stay where they are, under the
    user's names, and ``chosen_score``/``rejected_score`` are added as copies.
    """

    prompt: str = C.PROMPT
    chosen: str = C.CHOSEN
    rejected: str = C.REJECTED
    chosen_score: str | None = None
    rejected_score: str | None = None


def check_column_map(columns: ColumnMap) -> None:
    """The true-score options go together."""
    if (columns.chosen_score is None) != (columns.rejected_score is None):
        given = "--chosen-score-col" if columns.chosen_score is not None else "--rejected-score-col"
        raise PrefnoiseError(
            f"{given} needs its partner: give both --chosen-score-col and --rejected-score-col (one score per response)"
        )


def column_mapping(columns: ColumnMap) -> list[tuple[str, str, str]]:
    """(canonical column, given column or path, option) for every mapped column."""
    pairs = [
        (C.PROMPT, columns.prompt, "--prompt-col"),
        (C.CHOSEN, columns.chosen, "--chosen-col"),
        (C.REJECTED, columns.rejected, "--rejected-col"),
    ]
    if columns.chosen_score is not None and columns.rejected_score is not None:
        pairs.append((C.chosen(C.SCORE), columns.chosen_score, "--chosen-score-col"))
        pairs.append((C.rejected(C.SCORE), columns.rejected_score, "--rejected-score-col"))
    return pairs


def resolve_path(schema: pl.Schema | dict[str, pl.DataType], path: str, *, what: str) -> list[str]:
    """The parts of column or dotted ``path`` (``metadata.score_chosen``): a top-level column, then
    struct fields. A column whose own name contains dots wins; a name is matched longest first.
    PrefnoiseError, in one line naming ``what`` asked for it, when a part is missing or its parent
    is not a struct."""
    if path in schema:
        return [path]
    if not path or "." not in path:
        raise PrefnoiseError(f"no column {path!r} ({what}); columns are: {C.name_list(_visible(schema))}")
    names: dict[str, pl.DataType] = dict(schema)
    parts: list[str] = []
    rest = path
    where = "columns"
    while rest:
        match = next((n for n in sorted(names, key=len, reverse=True) if rest == n or rest.startswith(n + ".")), None)
        if match is None:
            field_name = rest.split(".", 1)[0]
            inside = f"struct {'.'.join(parts)!r} has no field" if parts else "no column"
            raise PrefnoiseError(
                f"{inside} {field_name!r} (path {path!r}, {what}); {where} are: {C.name_list(_visible(names))}"
            )
        parts.append(match)
        rest = rest[len(match) + 1 :]
        dtype = names[match]
        if not rest:
            break
        if not isinstance(dtype, pl.Struct):
            kind = "a list" if isinstance(dtype, pl.List | pl.Array) else f"of type {dtype}"
            raise PrefnoiseError(
                f"{'.'.join(parts)!r} is {kind}, not a struct, so it has no field {rest.split('.', 1)[0]!r} "
                f"(path {path!r}, {what})"
            )
        names = {f.name: f.dtype for f in dtype.fields}
        where = f"fields of {'.'.join(parts)!r}"
    return parts


def _visible(names: Any) -> list[str]:
    return [n for n in names if not str(n).startswith("__")]


def path_expr(parts: list[str]) -> pl.Expr:
    """The polars expression reading the column or nested struct field ``parts``."""
    expr = pl.col(parts[0])
    for part in parts[1:]:
        expr = expr.struct.field(part)
    return expr


def path_dtype(schema: pl.Schema | dict[str, pl.DataType], parts: list[str]) -> pl.DataType:
    """The type of the column or nested struct field ``parts``."""
    dtype = schema[parts[0]]
    for part in parts[1:]:
        dtype = {f.name: f.dtype for f in dtype.fields}[part]  # type: ignore[attr-defined]
    return dtype


def _without_field(expr: pl.Expr, dtype: pl.DataType, parts: list[str]) -> pl.Expr | None:
    """Struct ``expr`` without its nested field ``parts`` (None when nothing would be left); a null
    struct stays null."""
    fields = []
    for field_ in dtype.fields:  # type: ignore[attr-defined]
        value = expr.struct.field(field_.name)
        if field_.name == parts[0]:
            if len(parts) == 1:
                continue
            value = _without_field(value, field_.dtype, parts[1:])
            if value is None:
                continue
        fields.append(value.alias(field_.name))
    if not fields:
        return None
    return pl.when(expr.is_null()).then(None).otherwise(pl.struct(fields))


#: TRL's names for the true scores of the two responses (trl-lib/ultrafeedback_binarized has them).
TRL_SCORE_COLUMNS = ("score_chosen", "score_rejected")
_SCORE_WORDS = ("score", "rating")


def _is_number(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Null


def recognise_scores(columns: ColumnMap, schema: pl.Schema | dict[str, pl.DataType]) -> ColumnMap:
    """``columns`` with TRL's top-level ``score_chosen``/``score_rejected`` as the true scores when no
    true scores are mapped and the table has neither ``chosen_score`` nor ``rejected_score``."""
    if columns.chosen_score is not None or columns.rejected_score is not None:
        return columns
    if C.chosen(C.SCORE) in schema or C.rejected(C.SCORE) in schema:
        return columns
    if all(name in schema and _is_number(schema[name]) for name in TRL_SCORE_COLUMNS):
        chosen, rejected = TRL_SCORE_COLUMNS
        return ColumnMap(columns.prompt, columns.chosen, columns.rejected, chosen, rejected)
    return columns


def score_candidates(schema: pl.Schema | dict[str, pl.DataType]) -> list[tuple[str, str]]:
    """Numeric per-response pairs named like true scores (``score``/``rating`` in the name, e.g.
    ``metadata.score_chosen``/``metadata.score_rejected``), top-level or inside structs at any depth,
    as (chosen path, rejected path); ``chosen_score``/``rejected_score`` themselves excluded."""
    found: list[tuple[str, str]] = []

    def walk(fields: dict[str, pl.DataType], prefix: str) -> None:
        names = list(fields)
        for field_name, dtype in fields.items():
            if isinstance(dtype, pl.Struct):
                walk({f.name: f.dtype for f in dtype.fields}, f"{prefix}{field_name}.")
                continue
            partner = C.struct_partner(field_name, names)
            if partner is None or _responds(field_name) != C.CHOSEN or not _is_number(dtype):
                continue
            if not _is_number(fields[partner]) or not any(w in field_name.lower() for w in _SCORE_WORDS):
                continue
            if prefix or field_name != C.chosen(C.SCORE):
                found.append((prefix + field_name, prefix + partner))

    walk(dict(schema), "")
    return found


def score_hint(schema: pl.Schema | dict[str, pl.DataType]) -> str:
    """``; true scores may be in A/B: pass --chosen-score-col A --rejected-score-col B`` naming the
    first :func:`score_candidates` pair, or "" when there is none."""
    candidates = score_candidates(schema)
    if not candidates:
        return ""
    chosen, rejected = candidates[0]
    return (
        f"; true scores may be in {chosen}/{rejected}: pass --chosen-score-col {chosen} "
        f"--rejected-score-col {rejected}"
    )


def _responds(name: str) -> str | None:
    """Which response a per-response field name describes (``chosen``/``rejected``), or None."""
    for side in (C.CHOSEN, C.REJECTED):
        if name.startswith(side + "_") or name.endswith("_" + side):
            return side
    return None


def _paired_paths(chosen: list[str], rejected: list[str]) -> bool:
    """Whether two resolved paths are one field pair that swaps with the responses on a flip:
    same parent, leaf names partners (``score_chosen``/``score_rejected``, ``chosen_x``/``rejected_x``)."""
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        return False
    leaf = chosen[-1]
    return _responds(leaf) == C.CHOSEN and C.struct_partner(leaf, [rejected[-1]]) == rejected[-1]


def map_score_columns(lazy: pl.LazyFrame, columns: ColumnMap, name: str) -> pl.LazyFrame:
    """``lazy`` with the true-score columns of ``columns`` (columns or dotted paths; TRL's
    ``score_chosen``/``score_rejected`` when none are given, :func:`recognise_scores`) added as
    ``chosen_score``/``rejected_score``, for readers of the raw table (``rank-check``); the
    sources stay in place."""
    schema = lazy.collect_schema()
    columns = recognise_scores(columns, schema)
    mapping = [m for m in column_mapping(columns)[3:] if m[1] != m[0]]
    if not mapping:
        return lazy
    given_names = {given for _, given, _ in mapping}
    exprs = []
    for canonical, given, flag in mapping:
        try:
            parts = resolve_path(schema, given, what=f"asked for by {flag}")
        except PrefnoiseError as error:
            raise PrefnoiseError(f"{name}: {error.message}") from None
        _check_score_source(schema, parts, canonical, given, flag, given_names, name)
        exprs.append(path_expr(parts).alias(canonical))
    return lazy.with_columns(exprs)


def _check_score_source(
    schema: Any, parts: list[str], canonical: str, given: str, flag: str, given_names: set[str], name: str
) -> None:
    """A true-score source must be numeric and must not silently replace an existing score column."""
    dtype = path_dtype(schema, parts)
    if not (dtype.is_numeric() or dtype == pl.Null):
        raise PrefnoiseError(f"{name}: {flag} {given}: has type {dtype}; true scores must be numbers (int or float)")
    if canonical in schema and canonical not in given_names:
        raise PrefnoiseError(
            f"{name}: column {canonical!r} exists already and {flag} {given} would replace it; "
            f"drop {flag} to use the existing column, or rename that column"
        )


def apply_column_map(frame: pl.DataFrame, columns: ColumnMap, name: str) -> pl.DataFrame:
    """Move every mapped column (a top-level column or a dotted path into structs) to its canonical
    name; true scores named as a pair stay in place and are copied (see :class:`ColumnMap`)."""
    columns = recognise_scores(columns, frame.schema)
    mapping = [(canonical, given, flag) for canonical, given, flag in column_mapping(columns) if given != canonical]
    if not mapping:
        return frame
    given_names = {given for _, given, _ in column_mapping(columns)}
    resolved: list[tuple[str, list[str]]] = []
    for canonical, given, flag in mapping:
        try:
            resolved.append((canonical, resolve_path(frame.schema, given, what=f"asked for by {flag}")))
        except PrefnoiseError as error:
            raise PrefnoiseError(f"{name}: {error.message}") from None
    score_names = (C.chosen(C.SCORE), C.rejected(C.SCORE))
    scores = {canonical: parts for canonical, parts in resolved if canonical in score_names}
    kept = set(scores) if scores and _paired_paths(*scores.values()) else set()
    for canonical, given, flag in mapping:
        if canonical in scores:
            if canonical in kept and canonical in frame.columns and _same_values(frame, scores[canonical], canonical):
                frame = frame.drop(canonical)  # prefnoise's own copy from an earlier run: made again below
            _check_score_source(frame.schema, scores[canonical], canonical, given, flag, given_names, name)
    copies = [path_expr(scores[canonical]).alias(canonical) for canonical in score_names if canonical in kept]
    resolved = [(canonical, parts) for canonical, parts in resolved if canonical not in kept]
    # read every value before anything is renamed or taken apart
    nested = [(canonical, parts) for canonical, parts in resolved if len(parts) > 1]
    read = copies + [path_expr(parts).alias(canonical) for canonical, parts in nested]
    values = frame.select(read) if read else None
    for column in dict.fromkeys(parts[0] for _, parts in nested):
        for _, parts in nested:
            if parts[0] != column or column not in frame.columns:
                continue
            remaining = _without_field(pl.col(column), frame.schema[column], parts[1:])
            frame = frame.drop(column) if remaining is None else frame.with_columns(remaining.alias(column))
    renames = {parts[0]: canonical for canonical, parts in resolved if len(parts) == 1}
    for canonical, _ in resolved:
        if canonical in frame.columns and canonical not in renames:
            frame = frame.rename({canonical: f"original_{canonical}"})
    frame = frame.rename(renames) if renames else frame
    return frame.with_columns(values) if values is not None else frame


def _same_values(frame: pl.DataFrame, parts: list[str], column: str) -> bool:
    """Whether column ``column`` holds the same values as the field at ``parts`` (nulls alike)."""
    source, copy = path_expr(parts), pl.col(column)
    same = (source == copy) | (source.is_null() & copy.is_null())
    return bool(frame.select(same.fill_null(False).all()).item())
