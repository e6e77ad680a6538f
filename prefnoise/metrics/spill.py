"""Buckets of records that spill to disk, for passes over more rows than memory should hold.

A :class:`Buckets` store takes chunks of equal-length numpy columns with a bucket number per row
and hands each bucket back whole. With one bucket it keeps the chunks in memory; with more, each
bucket's rows are appended to its own file in a private temporary directory (removed on
``close``; files are opened per write, so any number of buckets works), and a partitioned pass
holds one bucket at a time, not the whole table.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from prefnoise.errors import PrefnoiseError


class Buckets:
    """``n`` buckets of records with the fields of ``dtype`` (a numpy structured dtype)."""

    def __init__(self, dtype: np.dtype | list[tuple[str, str]], n: int, temp_dir: str | Path | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.n = n
        self.sizes = np.zeros(n, dtype=np.int64)
        self._chunks: list[list[np.ndarray]] = [[] for _ in range(n)] if n == 1 else []
        self.directory: Path | None = None
        if n > 1:
            try:
                self.directory = Path(tempfile.mkdtemp(prefix="prefnoise-buckets-", dir=temp_dir))
            except OSError as error:
                raise PrefnoiseError(
                    f"cannot create a temporary directory in {temp_dir or tempfile.gettempdir()}: "
                    f"{error.strerror}; pass --temp-dir"
                ) from None

    def add(self, columns: Mapping[str, np.ndarray], bucket: np.ndarray | int = 0) -> None:
        """Append rows (one array per field, equal lengths) to the buckets numbered in ``bucket``
        (an int array, one per row, or one bucket for all rows)."""
        names = self.dtype.names or ()
        size = len(columns[names[0]])
        if size == 0:
            return
        records = np.empty(size, dtype=self.dtype)
        for name in names:
            records[name] = columns[name]
        if isinstance(bucket, int | np.integer):
            self._write(int(bucket), records)
            return
        order = np.argsort(bucket, kind="stable")
        counts = np.bincount(bucket, minlength=self.n)
        records = records[order]
        ends = np.cumsum(counts)
        for i in np.flatnonzero(counts):
            self._write(int(i), records[ends[i] - counts[i] : ends[i]])

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Bucket ``i``'s rows in the order they were added, one contiguous array per field."""
        if self.n == 1:
            chunks = self._chunks[i]
            records = np.concatenate(chunks) if chunks else np.empty(0, dtype=self.dtype)
        elif self.sizes[i]:
            records = np.fromfile(self._path(i), dtype=self.dtype)
        else:
            records = np.empty(0, dtype=self.dtype)
        return self._columns(records)

    def _columns(self, records: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(records[name]) for name in self.dtype.names or ()}

    def read_chunks(self, i: int, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """Bucket ``i``'s rows in the order they were added, at most ``rows`` at a time."""
        if self.n == 1:
            records = np.concatenate(self._chunks[i]) if self._chunks[i] else np.empty(0, dtype=self.dtype)
            for start in range(0, len(records), rows):
                yield self._columns(records[start : start + rows])
            return
        size = int(self.sizes[i])
        for start in range(0, size, rows):
            count = min(rows, size - start)
            yield self._columns(
                np.fromfile(self._path(i), dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)
            )

    def close(self) -> None:
        """Drop every bucket (and the temporary directory)."""
        self._chunks = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _write(self, i: int, records: np.ndarray) -> None:
        self.sizes[i] += len(records)
        if self.n == 1:
            self._chunks[i].append(records)
        else:
            try:
                with open(self._path(i), "ab") as handle:  # opened per write: no limit on open files
                    handle.write(records.tobytes())
            except OSError as error:
                raise PrefnoiseError(
                    f"cannot write temporary files in {self.directory}: {error.strerror}; free some space or "
                    "pass --temp-dir (or hold more in memory with --memory-responses)"
                ) from None

    def _path(self, i: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{i}.bin"

    def __enter__(self) -> Buckets:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
