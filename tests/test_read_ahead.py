"""ReadAhead: batches read on a thread, in order, errors re-raised, bounded, stopped on exit."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefnoise.data import ReadAhead
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke


def test_yields_every_batch_in_order():
    with ReadAhead(iter(range(50))) as batches:
        assert list(batches) == list(range(50))


def test_reader_error_is_reraised_as_is_after_the_batches_before_it():
    def source():
        yield 1
        yield 2
        raise PrefnoiseError("data.parquet: row 7: column 'chosen' is not valid UTF-8")

    seen = []
    with pytest.raises(PrefnoiseError, match=r"^data.parquet: row 7: column 'chosen' is not valid UTF-8$"):
        with ReadAhead(source()) as batches:
            for item in batches:
                seen.append(item)
    assert seen == [1, 2]


def test_reader_stays_at_most_depth_batches_ahead():
    produced = []

    def source():
        for item in range(100):
            produced.append(item)
            yield item

    with ReadAhead(source(), depth=2) as batches:
        first = next(iter(batches))
        deadline = time.monotonic() + 10.0
        while len(produced) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        # one taken, two queued, one made and waiting for room
        assert first == 0
        assert len(produced) == 4


def test_leaving_early_stops_the_reader_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            closed.set()

    reader = ReadAhead(source(), depth=1)
    with reader as batches:
        assert next(iter(batches)) == 0
    assert closed.wait(1.0)
    assert not reader._thread.is_alive()


def test_corrupt_reports_an_error_in_a_later_batch_as_one_line_and_writes_nothing(tmp_path):
    rows = 40_000  # three read batches: the bad row is read on the read-ahead thread, not for the schema
    chosen = [b"c%d" % i for i in range(rows)]
    chosen[35_000] = b"o\xffk"
    table = pa.table(
        {
            "prompt": [f"p{i}" for i in range(rows)],
            "chosen": pa.array(chosen, pa.binary()).view(pa.string()),
            "rejected": [f"r{i}" for i in range(rows)],
        }
    )
    source, out = tmp_path / "late.parquet", tmp_path / "out.parquet"
    pq.write_table(table, source)
    expected = f"{source}: invalid UTF-8 in column 'chosen' at row 35001; re-encode the file as UTF-8"
    assert_one_line_error(invoke("corrupt", source, out, "--rate", "0.2"), expected)
    assert_nothing_written(out)
