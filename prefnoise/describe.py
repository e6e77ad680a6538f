"""Column statistics of a preference table, for `prefnoise inspect`."""

from __future__ import annotations

from typing import Any

import polars as pl


def column_stats(frame: pl.LazyFrame | pl.DataFrame) -> list[dict[str, Any]]:
    """Per column: dtype, nulls, and a type-appropriate summary (text length, numeric range, true share)."""
    lazy = frame.lazy()
    schema = lazy.collect_schema()
    exprs: list[pl.Expr] = [pl.len().alias("__rows")]
    for name, dtype in schema.items():
        col = pl.col(name)
        exprs.append(col.null_count().alias(f"{name}\x00nulls"))
        if dtype == pl.String:
            length = col.str.len_chars()
            exprs += [length.mean().alias(f"{name}\x00mean_len"), length.max().alias(f"{name}\x00max_len")]
        elif dtype.is_numeric():
            exprs += [
                col.cast(pl.Float64).mean().alias(f"{name}\x00mean"),
                col.cast(pl.Float64).std().alias(f"{name}\x00std"),
                col.cast(pl.Float64).min().alias(f"{name}\x00min"),
                col.cast(pl.Float64).max().alias(f"{name}\x00max"),
            ]
        elif dtype == pl.Boolean:
            exprs.append(col.cast(pl.Float64).mean().alias(f"{name}\x00true_share"))
        elif isinstance(dtype, (pl.List, pl.Array)):
            exprs.append(
                col.list.len().mean().alias(f"{name}\x00mean_len")
                if isinstance(dtype, pl.List)
                else pl.lit(dtype.size).alias(f"{name}\x00mean_len")
            )
    row = lazy.select(exprs).collect(engine="streaming").row(0, named=True)
    stats = []
    for name, dtype in schema.items():
        entry: dict[str, Any] = {"column": name, "dtype": str(dtype)}
        for key, value in row.items():
            column, _, stat = key.partition("\x00")
            if column == name:
                entry[stat] = value
        stats.append(entry)
    return stats
