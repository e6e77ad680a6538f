"""A bound on how deeply input values nest. Arrow's JSON parser and polars recurse once per level,
so a single line nested thousands deep crashes the process (a segmentation fault, no message);
prefnoise refuses such input first, in one line naming the file and line (or column)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from prefnoise.errors import PrefnoiseError

MAX_NESTING = 100  # levels of lists/objects; real preference data (messages, metadata) uses under 10
# every byte that matters for nesting, as a small code; all others map to 0
_OPEN_MARK, _CLOSE_MARK, _QUOTE_MARK, _BACKSLASH_MARK = 1, 2, 3, 4
_CODES = {ord("["): 1, ord("{"): 1, ord("]"): 2, ord("}"): 2, ord('"'): 3, ord("\\"): 4}
_MARKS = bytes(_CODES.get(byte, 0) for byte in range(256))


def too_deep_message(label: str, where: str) -> str:
    """The one-line error for input nested deeper than :data:`MAX_NESTING` levels."""
    return (
        f"{label}: {where} nests values more than {MAX_NESTING} levels deep; prefnoise reads at most "
        f"{MAX_NESTING} (deeper input crashes the readers); flatten or drop that value"
    )


def type_depth(dtype: pa.DataType) -> int:
    """How many list/struct/map levels Arrow type ``dtype`` nests (0 for a flat type); stops counting
    past :data:`MAX_NESTING` so a hostile type costs no more than the bound."""
    depth, frontier = 0, [dtype]
    while frontier and depth <= MAX_NESTING:
        children = []
        for item in frontier:
            if pa.types.is_dictionary(item):
                children.append(item.value_type)
            elif item.num_fields:
                children.extend(item.field(i).type for i in range(item.num_fields))
        if any(item.num_fields for item in frontier):
            depth += 1
        frontier = children
    return depth


def check_type_depth(schema: pa.Schema, label: str) -> None:
    """PrefnoiseError naming the first column of ``schema`` nested deeper than :data:`MAX_NESTING`."""
    for field in schema:
        if type_depth(field.type) > MAX_NESTING:
            raise PrefnoiseError(too_deep_message(label, f"column {field.name!r}"))


class DepthCheckedJson:
    """A binary stream of JSON lines that ends early as soon as its bytes nest more than
    :data:`MAX_NESTING` levels, before a parser sees them; ``error`` then holds the one-line
    PrefnoiseError (naming ``label`` and the line) for the reader to raise. (Raising inside pyarrow's
    reading thread instead can abort the process when it exits.)

    Brackets inside strings do not count (escaped quotes are followed across reads). The check is
    vectorised over each block, so it costs a small fraction of parsing.
    """

    def __init__(self, inner: pa.NativeFile, label: str) -> None:
        self.inner, self.label = inner, label
        self.closed = False
        self.error: PrefnoiseError | None = None
        self._depth = 0  # open brackets outside strings so far
        self._in_string = False
        self._backslashes = 0  # run of backslashes ending the previous block
        self._lines = 0  # newlines before the current block
        self._position = 0
        self._reading = 0  # reads in progress (pyarrow's read-ahead calls from its IO threads)
        self._last_read = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all when negative), checked."""
        self._reading += 1
        try:
            return self._read(size)
        finally:
            self._reading -= 1
            self._last_read = time.monotonic()

    def wait_idle(self, quiet: float = 0.05, limit: float = 2.0) -> None:
        """Wait until no read is in progress and none came for ``quiet`` seconds (at most ``limit``).

        When parsing stops early (a parse error, a nesting error), pyarrow's read-ahead may still call
        :meth:`read` from its IO thread; if that call comes while Python exits, the thread is torn down
        inside C++ and the process aborts ("terminate called without an active exception").
        """
        end = time.monotonic() + limit
        while time.monotonic() < end and (self._reading or time.monotonic() - self._last_read < quiet):
            time.sleep(quiet / 5)

    def _read(self, size: int) -> bytes:
        if self.error is not None or self.closed:
            return b""
        data = self.inner.read() if size is None or size < 0 else self.inner.read(size)
        data = bytes(data)
        if data:
            try:
                self._scan(data)
            except PrefnoiseError as error:
                self.error = error
                return b""
            self._position += len(data)
        return data

    def _scan(self, data: bytes) -> None:
        marks = np.frombuffer(data.translate(_MARKS), dtype=np.uint8)  # one C pass; the rest is sparse
        where = np.flatnonzero(marks)
        kinds = marks[where]
        slashes = where[kinds == _BACKSLASH_MARK]
        quotes = where[kinds == _QUOTE_MARK]
        real = quotes[_backslashes_before(slashes, quotes, self._backslashes) % 2 == 0]  # odd: escaped
        brackets = where[(kinds == _OPEN_MARK) | (kinds == _CLOSE_MARK)]
        inside = (np.searchsorted(real, brackets) + self._in_string) % 2 == 1
        outside = brackets[~inside]
        depth = self._depth + np.cumsum(np.where(marks[outside] == _OPEN_MARK, 1, -1))
        if len(depth) and depth.max() > MAX_NESTING:
            at = int(outside[np.argmax(depth > MAX_NESTING)])
            line = self._lines + data.count(b"\n", 0, at) + 1
            raise PrefnoiseError(too_deep_message(self.label, f"line {line}"))
        self._depth = int(depth[-1]) if len(depth) else self._depth
        self._in_string = bool((len(real) + self._in_string) % 2)
        if len(slashes) and slashes[-1] == len(data) - 1:  # a run of backslashes ends the block
            first = int(_run_starts(slashes)[-1])
            self._backslashes = len(data) - first + (self._backslashes if first == 0 else 0)
        else:
            self._backslashes = 0
        self._lines += data.count(b"\n")

    def readable(self) -> bool:
        """A readable stream."""
        return True

    def seekable(self) -> bool:
        """Not seekable: read once, front to back."""
        return False

    def tell(self) -> int:
        """Bytes read so far."""
        return self._position

    def close(self) -> None:
        """Close the underlying stream."""
        self.closed = True
        self.inner.close()


def read_json_checked(stream: pa.NativeFile, label: str, options: pa_json.ReadOptions) -> Iterator[pa.RecordBatch]:
    """The record batches of JSON lines ``stream``, each line checked for nesting first: a
    PrefnoiseError naming ``label`` and the line when one nests more than :data:`MAX_NESTING` levels."""
    checked = DepthCheckedJson(stream, label)
    finished = False
    try:
        for batch in pa_json.open_json(pa.PythonFile(checked, mode="r"), read_options=options):
            if checked.error is not None:
                break
            yield batch
        finished = checked.error is None
    except pa.ArrowException:
        if checked.error is None:
            raise
    finally:
        checked.closed = True  # read-ahead still pending gets end of file
        if not finished:
            checked.wait_idle()
        checked.close()
    if checked.error is not None:
        raise checked.error


def _run_starts(positions: np.ndarray) -> np.ndarray:
    """For each of the sorted ``positions``, where its run of consecutive positions starts."""
    if not len(positions):
        return positions
    starts = np.ones(len(positions), dtype=bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    return positions[np.maximum.accumulate(np.where(starts, np.arange(len(positions)), 0))]


def _backslashes_before(slashes: np.ndarray, quotes: np.ndarray, carried: int) -> np.ndarray:
    """How many backslashes directly precede each quote position; a run that reaches the block's
    start adds the ``carried`` backslashes that ended the previous block."""
    if not len(slashes):
        return np.where(quotes == 0, carried, 0)
    starts = _run_starts(slashes)
    last = np.maximum(np.searchsorted(slashes, quotes) - 1, 0)
    touching = slashes[last] == quotes - 1
    run = np.where(touching, quotes - starts[last], 0)
    reaches_start = np.where(touching, starts[last] == 0, quotes == 0)
    return run + np.where(reaches_start, carried, 0)
