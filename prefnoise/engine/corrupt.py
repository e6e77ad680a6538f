"""``corrupt`` on Ray: each block's flips on a worker, the flip counts merged on the driver exactly.

Flips are a pure function of (seed, pair_id, the pair's columns), so a block needs nothing but itself;
``--exact`` needs each group's global threshold, found by a first pass that brings back every usable
pair's draw (8 bytes a pair) and the same arithmetic as the local engine. The blocks come back in input
order and the counts are added in that order, so the output and the summary equal a one-process run's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import polars as pl

from prefnoise.engine.blocks import BlockInfo, map_blocks
from prefnoise.engine.session import RaySession
from prefnoise.noise import (
    CorruptionStats,
    NoiseSpec,
    corrupt_batches,
    exact_draws,
    thresholds_of_draws,
)


def corrupt_block(
    frame: pl.DataFrame, info: BlockInfo, *, spec: NoiseSpec, thresholds: dict[str, float] | None, name: str | None
) -> tuple[pl.DataFrame | None, int, CorruptionStats]:
    """(the corrupted block or None when no usable row is left, its input rows, its flip counts)."""
    stats = CorruptionStats()
    out = list(corrupt_batches([frame], spec, stats=stats, thresholds=thresholds, name=name,
                               row_offset=info.row_offset))
    return (out[0] if out else None), frame.height, stats


def draws_block(frame: pl.DataFrame, info: BlockInfo, *, spec: NoiseSpec, name: str | None) -> dict[str, np.ndarray]:
    """The block's usable draws by group (its share of the ``--exact`` thresholds)."""
    return exact_draws(frame, spec, info.row_offset, name)


def exact_thresholds_on_ray(
    session: RaySession, batches: Iterable[pl.DataFrame], spec: NoiseSpec, *, name: str | None = None
) -> dict[str, float]:
    """:func:`prefnoise.noise.exact_thresholds`, each block's draws taken on the cluster."""
    draws: dict[str, list[np.ndarray]] = {}
    for part in map_blocks(session, batches, functools.partial(draws_block, spec=spec, name=name)):
        for group, values in part.items():
            draws.setdefault(group, []).append(values)
    return thresholds_of_draws(draws, spec)


def corrupt_on_ray(
    session: RaySession,
    batches: Iterable[pl.DataFrame],
    spec: NoiseSpec,
    *,
    stats: CorruptionStats,
    thresholds: dict[str, float] | None = None,
    on_progress: Callable[[int], None] | None = None,
    name: str | None = None,
) -> Iterator[pl.DataFrame]:
    """:func:`prefnoise.noise.corrupt_batches` with each block corrupted on the cluster: the same frames in
    the same order, and the same counts in ``stats``."""
    work = functools.partial(corrupt_block, spec=spec, thresholds=thresholds, name=name)
    for frame, height, part in map_blocks(session, batches, work):
        stats.merge(part)
        if frame is not None:
            yield frame
        if on_progress is not None:
            on_progress(height)
