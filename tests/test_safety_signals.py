"""Signals: SIGTERM and SIGHUP clean up exactly like Ctrl-C and exit 143 / 129 with nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

# one worker runs these one after another: two corrupt runs killed at once on 2 cores made the timing flaky
pytestmark = pytest.mark.xdist_group("signals")

ROOT = Path(__file__).resolve().parents[1]


def start(args, tmp_dir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_dir)}
    return subprocess.Popen([sys.executable, "-m", "prefnoise", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the command to reach the state under test")
        time.sleep(0.005)


def finish(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.fixture(scope="module")
def big_pairs(tmp_path_factory) -> Path:
    """400k pairs with rewards: large enough that corrupt and rank-check run for a few seconds."""
    n = 400_000
    rng = np.random.default_rng(0)
    prompts = np.arange(n) // 4
    frame = pl.DataFrame({
        "prompt": [f"prompt {p}" for p in prompts],
        "chosen": [f"chosen answer {i} with some words" for i in range(n)],
        "rejected": [f"rejected answer {i} with some words" for i in range(n)],
        "chosen_score": rng.normal(size=n),
        "rejected_score": rng.normal(size=n),
        "chosen_reward": rng.normal(size=n),
        "rejected_reward": rng.normal(size=n),
    })
    path = tmp_path_factory.mktemp("big") / "pairs.parquet"
    frame.write_parquet(path)
    return path


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_while_writing_leaves_no_partial_output(tmp_path, big_pairs, sig, code):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = start(["corrupt", big_pairs, out_dir / "noisy.parquet", "--rate", "0.2"], temp)
    writing = lambda: any(p.name.startswith(".noisy.parquet.tmp-") for p in out_dir.iterdir())  # noqa: E731
    wait_for(lambda: writing() or proc.poll() is not None)
    assert proc.poll() is None, "the command finished before the signal; make the input larger"
    returncode, stderr = finish(proc, sig)
    assert returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == [] and list(temp.iterdir()) == []


SIGNAL_AS_THE_WRITER_STARTS = """
import os, signal, sys, time
from prefnoise.data import write
start = write._SinkWriter.__init__
def start_then_signal(self, *args, **kwargs):
    start(self, *args, **kwargs)  # the sink's thread runs and will create the file
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # a signal not held back is raised here, before write_table holds the writer
write._SinkWriter.__init__ = start_then_signal
from prefnoise.__main__ import run
sys.argv = ["prefnoise", *sys.argv[1:]]
run()
"""


def test_sigterm_as_the_parquet_writer_starts_leaves_nothing(tmp_path, sample_path):
    """A stop signal between the writer thread's start and the command holding the writer used to leave the
    temporary file behind: the thread created it after the clean-up had run."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SIGNAL_AS_THE_WRITER_STARTS, "corrupt", str(sample_path),
                           str(out_dir / "noisy.parquet"), "--rate", "0.2"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 143, done.stderr.decode()
    time.sleep(0.5)  # the writer thread, had it outlived the process's clean-up, would have created it by now
    assert list(out_dir.iterdir()) == []


def test_sigterm_while_reading_stdin_removes_the_spooled_copy(tmp_path, sample_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = start(["corrupt", "-", tmp_path / "o.parquet", "--rate", "0.2"], temp, stdin=subprocess.PIPE)
    proc.stdin.write(sample_path.read_bytes()[:1000])  # part of the file; stdin stays open
    proc.stdin.flush()
    wait_for(lambda: any(p.name.startswith("prefnoise-stdin-") for p in temp.iterdir()))
    returncode, stderr = finish(proc, signal.SIGTERM)
    assert returncode == 143, stderr
    assert "Terminated" in stderr and "Traceback" not in stderr
    assert list(temp.iterdir()) == [] and not (tmp_path / "o.parquet").exists()


def test_sigterm_during_rank_check_removes_its_spill_buckets(tmp_path, big_pairs):
    spill = tmp_path / "spill"
    spill.mkdir()
    proc = start(["rank-check", big_pairs, "--memory-responses", "20000", "--temp-dir", spill, "--bootstrap", "0"],
                 tmp_path)
    wait_for(lambda: any(spill.iterdir()) or proc.poll() is not None)
    assert proc.poll() is None, "rank-check finished before the signal"
    wait_for(lambda: any(p.is_file() for p in spill.rglob("*")) or proc.poll() is not None)
    returncode, stderr = finish(proc, signal.SIGTERM)
    assert returncode == 143, stderr
    assert "Traceback" not in stderr
    assert list(spill.iterdir()) == []
