"""Blocks of a table through Ray Data, results back in input order: the engine's one scatter/gather.

The driver cuts the input into blocks (the same canonical batches the local engine streams), Ray Data
runs ``work`` on each block on the cluster's workers (``session.workers`` at once), and the results come
back in input order, so whatever the driver merges or writes equals the one-process run. A
:class:`PrefnoiseError` raised by ``work`` travels back as a value and is raised on the driver at its
block, so the first bad block in input order names the problem, as the local engine would.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from prefnoise.engine.session import RaySession, quiet_ray_warnings, require_ray
from prefnoise.errors import PrefnoiseError

PAYLOAD = "payload"  # the one column of a block's row: the pickled (block, info) or (result, error)
WINDOW_PER_WORKER = 4  # blocks in flight per worker; bounds the driver's memory to a few blocks each


@dataclass(frozen=True)
class BlockInfo:
    """Where a block sits in its input: ``index`` (0-based) and ``row_offset`` (rows before it)."""

    index: int
    row_offset: int


def _pack(value: Any) -> pa.Table:
    return pa.table({PAYLOAD: pa.array([pickle.dumps(value, protocol=5)], type=pa.large_binary())})


def _unpack(table: pa.Table) -> Any:
    return pickle.loads(table.column(PAYLOAD)[0].as_py())


class _Apply:
    """Ray Data's callable: unpickle (frame, info), run ``work`` (a function, or a class built once per
    actor with ``setup`` and then called), pickle (result, error message)."""

    def __init__(self, work: Callable[..., Any], setup: tuple[Any, ...] | None) -> None:
        self.work = work(*setup) if setup is not None else work

    def __call__(self, batch: pa.Table) -> pa.Table:
        frame, info = _unpack(batch)
        try:
            return _pack((self.work(frame, info), None))
        except PrefnoiseError as error:
            return _pack((None, (True, error.message, error.exit_code)))
        except Exception as error:  # a bug, not the user's: exit 3 on the driver, naming the block and the type
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return _pack((None, (False, f"block {info.index}: {type(error).__name__}: {reason}", 3)))


class BlockFailed(RuntimeError):
    """An unexpected error of ``work`` on a Ray worker (an internal error: the CLI exits 3 and names it)."""


def _apply_function(batch: pa.Table, work: Callable[..., Any]) -> pa.Table:
    return _Apply(work, None)(batch)


def _run_window(
    session: RaySession, window: list[tuple[pl.DataFrame, BlockInfo]], work: Callable[..., Any],
    setup: tuple[Any, ...] | None, num_gpus: float,
) -> Iterator[Any]:
    """One Ray Data execution over ``window``'s blocks; yields the results in order (Ray's own warnings about
    its configuration, e.g. fewer blocks than workers, are not the user's to act on: silenced unless
    :data:`~prefnoise.engine.session.RAY_OUTPUT`)."""
    ray = require_ray()
    with quiet_ray_warnings():  # not around a yield: the filter must not outlive the window
        results = list(_execute(ray, session, window, work, setup, num_gpus))
    yield from results


def _execute(
    ray: Any, session: RaySession, window: list[tuple[pl.DataFrame, BlockInfo]], work: Callable[..., Any],
    setup: tuple[Any, ...] | None, num_gpus: float,
) -> Iterator[Any]:
    dataset = ray.data.from_arrow([_pack(item) for item in window])
    common = {"batch_size": None, "batch_format": "pyarrow", "zero_copy_batch": True}
    if num_gpus:
        common["num_gpus"] = num_gpus
    if setup is None:
        mapped = dataset.map_batches(
            _apply_function, fn_kwargs={"work": work}, concurrency=session.workers, **common
        )
    else:
        # max_restarts=0: Ray Data's default (restart a dead actor forever, retry its blocks forever) would
        # retry a block that kills its actor (out of memory) without end, and makes Ray's core print an
        # error line on stderr for every actor whose constructor arguments sit in the object store
        mapped = dataset.map_batches(
            _Apply, fn_constructor_args=(work, setup), concurrency=(1, session.workers), max_restarts=0, **common
        )
    for block in mapped.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for start in range(block.num_rows):
            result, error = _unpack(block.slice(start, 1))
            if error is not None:
                expected, message, code = error
                raise PrefnoiseError(message, code) if expected else BlockFailed(message)
            yield result


def map_blocks(
    session: RaySession,
    frames: Iterable[pl.DataFrame],
    work: Callable[..., Any],
    *,
    setup: tuple[Any, ...] | None = None,
    num_gpus: float = 0,
    window: int | None = WINDOW_PER_WORKER,
) -> Iterator[Any]:
    """``work(frame, info)`` of each frame of ``frames`` (info: its :class:`BlockInfo`), run by Ray Data on
    the session's workers, yielded in input order.

    ``work`` must be picklable (a module-level function or class). With ``setup`` it is a class built once
    per Ray actor as ``work(*setup)`` (load a model once) and then called per block; ``num_gpus`` per actor
    or task. ``frames`` are read lazily, ``window`` blocks per worker at a time (one Ray Data execution
    each: actors are built again per window), so memory stays bounded however long the input; ``window=None``
    runs every block in one execution (``frames`` are then all read first). A PrefnoiseError of ``work`` is
    raised here at its block; any other error as :class:`BlockFailed`.
    """
    window_size = max(window * session.workers, 2) if window is not None else None
    offset, index = 0, 0
    iterator = iter(frames)
    while True:
        blocks = []
        for frame in itertools.islice(iterator, window_size):
            blocks.append((frame, BlockInfo(index=index, row_offset=offset)))
            index, offset = index + 1, offset + frame.height
        if not blocks:
            return
        yield from _run_window(session, blocks, work, setup, num_gpus)
