"""Reading ahead: the next record batch is read and checked on a thread of its own while the caller
works on the current one.

pyarrow decodes and validates with the GIL released, so a command that spends its time in Python on
each batch (hashing content ids, flipping, writing) overlaps with the decoding of the next one instead
of waiting for it. Measured on corrupt of 2M pairs without pair_id: bench/RESULTS.md.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

from prefnoise.atomic import stop_signals_deferred

T = TypeVar("T")

DEPTH = 1  # batches waiting in the queue; one more may be in the reader's hands: memory stays bounded
_POLL_S = 0.05  # how often a reader blocked on a full queue looks whether the caller has stopped


class _End:
    """The reader's last item: the source ran out."""


class _Failure:
    """The reader's last item when the source raised: the error, re-raised in the caller's thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterator[T], *, depth: int = DEPTH, name: str = "prefnoise-reader") -> Iterator[T]:
    """``items`` in order, each produced on a background thread up to ``depth`` + 1 ahead of the caller.

    An error of ``items`` is raised here, at its place in the sequence. Stopping early (``close``, an
    error or a signal in the caller) stops the reader and closes ``items`` in its own thread before this
    returns, so no file stays open behind it. Stop signals keep going to the caller's (main) thread."""
    pending: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                pending.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_End())
        except BaseException as error:  # re-raised in the caller's thread
            offer(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    with stop_signals_deferred():  # the reader inherits the blocked mask: a signal interrupts the caller
        reader = threading.Thread(target=produce, name=name, daemon=True)
        reader.start()
    try:
        while True:
            item = pending.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        reader.join()
