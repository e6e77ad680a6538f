"""Regressions of the second hostile sweep (issue 22, bench/hostile_sweep.py): one test per class of failure
it found, real processes where the rule is about a process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from prefnoise.data.nesting import DepthCheckedJson

ROOT = Path(__file__).resolve().parents[1]
BAD_SURROGATE = '{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}\n' * 3


def test_wait_idle_waits_for_a_read_in_progress():
    checked = DepthCheckedJson(pa.BufferReader(b"{}"), "x.jsonl")
    checked._reading = 1  # a read-ahead call inside read(), on another thread
    threading.Timer(0.2, lambda: setattr(checked, "_reading", 0)).start()
    started = time.monotonic()
    checked.wait_idle(quiet=0.01)
    assert time.monotonic() - started >= 0.19


def test_wait_idle_returns_at_once_when_reads_are_long_over():
    checked = DepthCheckedJson(pa.BufferReader(b"{}"), "x.jsonl")
    checked._last_read -= 10
    started = time.monotonic()
    checked.wait_idle(quiet=0.05)
    assert time.monotonic() - started < 0.04


@pytest.mark.slow
def test_a_json_parse_error_never_aborts_the_process_at_exit(tmp_path):
    # pyarrow's read-ahead called read() from its IO thread while Python exited: "terminate called without
    # an active exception", SIGABRT, about one run in four. Six runs at once (all six clean by chance: ~18%).
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text(BAD_SURROGATE)
    procs = [subprocess.Popen([sys.executable, "-m", "prefnoise", "-q", "inspect", "--json", str(bad)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(6)]
    results = [(proc.wait(timeout=120), proc.stderr.read().decode()) for proc in procs]
    assert [rc for rc, _ in results] == [2] * 6, results
    assert not any("terminate called" in err for _, err in results)
