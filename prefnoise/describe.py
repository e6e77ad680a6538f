"""Column statistics of a preference table, for `prefnoise inspect`."""

from __future__ import annotations

from typing import Any

import polars as pl


def column_stats(frame: pl.LazyFrame | pl.DataFrame) -> list[dict[str, Any]]:
    """Per column: dtype, nulls, and a type-appropriate summary (text length, numeric range, true share).

    Float columns summarise their finite values; NaN and infinite values are counted apart (``nan``,
    ``inf``, present only when there are some), so one bad value does not turn the summary into NaN.
    """
    lazy = frame.lazy()
    schema = lazy.collect_schema()
    exprs: list[pl.Expr] = [pl.len().alias("__rows")]
    for index, (name, dtype) in enumerate(schema.items()):
        col = pl.col(name)
        key = f"{index}\x00"  # statistics are keyed by column position: names may hold any character
        exprs.append(col.null_count().alias(f"{key}nulls"))
        if dtype == pl.String:
            length = col.str.len_chars()
            exprs += [length.mean().alias(f"{key}mean_len"), length.max().alias(f"{key}max_len")]
        elif dtype.is_numeric():
            values = col.cast(pl.Float64)
            if dtype.is_float():
                exprs += [col.is_nan().sum().alias(f"{key}nan"), col.is_infinite().sum().alias(f"{key}inf")]
                values = values.filter(values.is_finite())
            exprs += [
                values.mean().alias(f"{key}mean"),
                values.std().alias(f"{key}std"),
                values.min().alias(f"{key}min"),
                values.max().alias(f"{key}max"),
            ]
        elif dtype == pl.Boolean:
            exprs.append(col.cast(pl.Float64).mean().alias(f"{key}true_share"))
        elif isinstance(dtype, (pl.List, pl.Array)):
            exprs.append(
                col.list.len().mean().alias(f"{key}mean_len")
                if isinstance(dtype, pl.List)
                else pl.lit(dtype.size).alias(f"{key}mean_len")
            )
    row = lazy.select(exprs).collect(engine="streaming").row(0, named=True)
    stats = [{"column": name, "dtype": str(dtype)} for name, dtype in schema.items()]
    for key, value in row.items():  # one pass: linear in the number of columns
        position, _, stat = key.partition("\x00")
        if stat and not (stat in ("nan", "inf") and not value):
            stats[int(position)][stat] = value
    return stats
