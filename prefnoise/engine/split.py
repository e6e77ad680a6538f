"""``split`` on Ray: each block's side (train or test) decided on a worker, the table cut on the driver.

A row's side is a keyed hash of its prompt (or pair_id), so blocks are independent; the driver keeps the
table it read, gathers the blocks' masks in order and filters once, so both sides equal a one-process
run's row for row.
"""

from __future__ import annotations

import functools

import numpy as np
import polars as pl

from prefnoise.engine.blocks import BlockInfo, map_blocks
from prefnoise.engine.session import RaySession
from prefnoise.heldout import held_out_mask

SPLIT_BLOCK_ROWS = 16_384  # rows per block sent to a worker (the reader's batch size)


def held_out_block(frame: pl.DataFrame, info: BlockInfo, *, test_fraction: float, by: str, seed: int) -> np.ndarray:
    """The block's test-side mask (:func:`prefnoise.heldout.test_mask`)."""
    return held_out_mask(frame, test_fraction=test_fraction, by=by, seed=seed)


def split_on_ray(
    session: RaySession, frame: pl.DataFrame, *, test_fraction: float, by: str, seed: int,
    block_rows: int = SPLIT_BLOCK_ROWS,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`prefnoise.heldout.split_table` of a checked options' values, the masks computed on the cluster."""
    blocks = (frame.slice(start, block_rows) for start in range(0, frame.height, block_rows))
    work = functools.partial(held_out_block, test_fraction=test_fraction, by=by, seed=seed)
    parts = list(map_blocks(session, blocks, work))
    mask = pl.Series(np.concatenate(parts) if parts else np.zeros(0, dtype=bool))
    return frame.filter(~mask), frame.filter(mask)
