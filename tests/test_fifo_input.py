"""FIFO inputs are read once, as a stream (issue 22): a FIFO was opened twice and hung forever, and a
``.jsonl`` FIFO failed with "lseek failed" blamed on the output location."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from prefnoise.data import read_table
from tests.conftest import make_pairs

ROOT = Path(__file__).resolve().parents[1]


def _corrupt(source: Path, out: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefnoise", "corrupt", str(source), str(out), "--rate", "0.3", "--seed", "4"],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )


def _through_fifo(regular: Path, fifo: Path, out: Path) -> subprocess.CompletedProcess:
    """Run corrupt on ``fifo`` while a writer process copies ``regular`` into it once."""
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", 'cat "$0" > "$1"', str(regular), str(fifo)])
    try:
        return _corrupt(fifo, out)  # a second open of the FIFO would block here until the timeout
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".jsonl.gz", ".csv"])
def test_a_fifo_input_is_read_once_and_gives_the_files_result(tmp_path, suffix):
    regular = tmp_path / f"pairs{suffix}"
    frame = make_pairs(60)
    if suffix == ".parquet":
        frame.write_parquet(regular)
    elif suffix == ".csv":
        frame.write_csv(regular)
    else:
        frame.write_ndjson(tmp_path / "plain.jsonl")
        data = (tmp_path / "plain.jsonl").read_bytes()
        if suffix.endswith(".gz"):
            data = gzip.compress(data)
        regular.write_bytes(data)
    expected = tmp_path / "expected.parquet"
    assert _corrupt(regular, expected).returncode == 0
    out = tmp_path / "out.parquet"
    done = _through_fifo(regular, tmp_path / f"fifo{suffix}", out)
    assert done.returncode == 0, done.stderr
    got, want = read_table(out), read_table(expected)
    assert got.height == 60 and 0 < int(got["flipped"].sum()) < 60
    assert got.equals(want)  # flips are a function of seed and pair_id: the same as from the file


def test_the_spooled_copy_is_removed(tmp_path):
    regular = tmp_path / "pairs.parquet"
    make_pairs(10).write_parquet(regular)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    os.mkfifo(tmp_path / "fifo.parquet")
    writer = subprocess.Popen(["sh", "-c", 'cat "$0" > "$1"', str(regular), str(tmp_path / "fifo.parquet")])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "prefnoise", "corrupt", str(tmp_path / "fifo.parquet"), str(tmp_path / "o.jsonl"),
             "--rate", "0.1"],
            capture_output=True, text=True, timeout=90, cwd=ROOT, check=False,
            env={**os.environ, "TMPDIR": str(spool_dir)},
        )
    finally:
        writer.kill()
        writer.wait()
    assert done.returncode == 0, done.stderr
    assert pl.read_ndjson(tmp_path / "o.jsonl").height == 10
    assert list(spool_dir.iterdir()) == []


def test_a_device_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out.parquet"
    done = _corrupt(Path("/dev/zero"), out, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "Error: /dev/zero: is a device, not a table file; pass a file, a FIFO, or - for stdin\n"
    assert not out.exists()
