"""read_ahead: the next batch is produced on a thread of its own, in order, errors at their place, and
stopping early leaves no thread and no open source behind."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefnoise.data import open_source
from prefnoise.data.read_ahead import read_ahead
from prefnoise.errors import PrefnoiseError
from tests.conftest import make_pairs


class Source:
    """An iterator that records which thread produced each item and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.produced: list[int] = []
        self.threads: set[str] = set()
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> int:
        i = len(self.produced)
        if i == self.fail_at:
            raise PrefnoiseError(f"bad batch {i}")
        if i >= self.n:
            raise StopIteration
        self.produced.append(i)
        self.threads.add(threading.current_thread().name)
        return i

    def close(self) -> None:
        self.closed = True


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefnoise-reader"]


def test_items_come_in_order_from_another_thread():
    source = Source(50)
    assert list(read_ahead(source)) == list(range(50))
    assert source.threads == {"prefnoise-reader"}
    assert source.closed and not _readers()


def test_an_error_is_raised_at_its_place():
    got = []
    with pytest.raises(PrefnoiseError, match="bad batch 3"):
        for item in read_ahead(Source(10, fail_at=3)):
            got.append(item)
    assert got == [0, 1, 2]
    assert not _readers()


def test_the_reader_stays_at_most_depth_plus_one_ahead():
    source = Source(100)
    items = read_ahead(source, depth=1)
    assert next(items) == 0
    time.sleep(0.3)  # ample time for the reader to run ahead as far as it may
    assert len(source.produced) == 3  # the item handed out, one queued, one in the reader's hands
    items.close()
    assert source.closed and not _readers()
    assert len(source.produced) == 3


def test_stopping_early_stops_the_reader_and_closes_the_source():
    source = Source(1000)
    for item in read_ahead(source):
        if item == 5:
            break
    assert source.closed and not _readers()
    assert len(source.produced) < 10


def test_a_parquet_source_reads_ahead_with_the_same_batches_and_checks(tmp_path):
    path = tmp_path / "pairs.parquet"
    pairs = make_pairs(5000)
    pq.write_table(pairs.to_arrow(), path, row_group_size=700)
    source = open_source(path, batch_size=1000)
    frames = list(source.batches())
    assert [f.height for f in frames] == [1000] * 5  # iter_batches' batches, in order
    assert [p for f in frames for p in f["prompt"]] == pairs["prompt"].to_list()
    assert source.rows_read == 5000 and not _readers()

    bad = tmp_path / "bad.parquet"
    table = make_pairs(3000).to_arrow()
    chosen = [t.encode() for t in table.column("chosen").to_pylist()]
    chosen[2500] = b"o\xffk"  # invalid UTF-8 in the third batch, row 2501
    table = table.set_column(1, "chosen", pa.array(chosen, pa.binary()).view(pa.string()))
    pq.write_table(table, bad, row_group_size=1000)
    with pytest.raises(PrefnoiseError, match=r"invalid UTF-8 in column 'chosen' at row 2501;"):
        list(open_source(bad, batch_size=1000).batches())
    assert not _readers()


def test_peeking_at_the_schema_reads_one_batch_and_nothing_ahead(tmp_path, monkeypatch):
    path = tmp_path / "pairs.parquet"
    make_pairs(3000).write_parquet(path, row_group_size=1000)
    read = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    source = open_source(path, batch_size=1000)
    assert "pair_id" in source.schema and "prompt" in source.schema
    assert read == [1000]  # with reading ahead the peek would decode two more batches and throw them away
    assert [f.height for f in source.batches()] == [1000] * 3
