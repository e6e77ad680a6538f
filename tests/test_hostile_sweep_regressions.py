"""Regressions of the second hostile sweep (issue 22, bench/hostile_sweep.py): one test per class of failure
it found, real processes where the rule is about a process."""

from __future__ import annotations

import signal
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
    # an active exception", SIGABRT, about one run in four. Four runs at once (all four clean by chance: about a third).
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text(BAD_SURROGATE)
    procs = [subprocess.Popen([sys.executable, "-m", "prefnoise", "-q", "inspect", "--json", str(bad)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(4)]
    results = [(proc.wait(timeout=120), proc.stderr.read().decode()) for proc in procs]
    assert [rc for rc, _ in results] == [2] * 4, results
    assert not any("terminate called" in err for _, err in results)


def test_name_list_shows_twenty_names_then_counts_the_rest():
    from prefnoise.columns import name_list

    assert name_list(["a", "b"]) == "a, b"
    assert name_list([f"c{i}" for i in range(23)]) == ", ".join(f"c{i}" for i in range(20)) + ", ... and 3 more"


def test_a_table_of_3000_columns_without_the_required_ones_is_a_short_error_line(tmp_path):
    from tests.cli_helpers import assert_one_line_error, invoke

    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(3000)) + "\n" + ",".join("1" * 3000) + "\n")
    line = assert_one_line_error(invoke("corrupt", wide, tmp_path / "o.parquet", "--rate", "0.1"),
                                 "missing required column", "c19, ... and 2980 more")
    assert len(line) < 600
    line = assert_one_line_error(invoke("corrupt", wide, tmp_path / "o.parquet", "--rate", "0.1", "--prompt-col",
                                        "nope"), "no column 'nope'", "... and 2980 more")
    assert len(line) < 600


def test_a_lock_that_cannot_be_created_names_the_output(tmp_path):
    from tests.cli_helpers import assert_one_line_error, invoke

    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    line = assert_one_line_error(invoke("corrupt", src, "/proc/o.parquet", "--rate", "0.1"), "OUT /proc/o.parquet: "
                                 "cannot write in /proc", "give a writable place")
    assert "prefnoise-lock" not in line
    long_name = tmp_path / ("x" * 250 + ".csv")
    assert_one_line_error(invoke("corrupt", src, long_name, "--rate", "0.1"), "the name is too long")


def test_split_names_test_not_out_when_test_is_the_input(tmp_path):
    from tests.cli_helpers import assert_one_line_error, invoke

    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    line = assert_one_line_error(invoke("split", src, tmp_path / "train.parquet", src), "TEST ", "is the input")
    assert "OUT" not in line


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_libraries_load_exits_with_its_code_and_one_line(tmp_path, sig, code):
    # before, the CLI's handlers were not installed yet: SIGTERM killed the process raw (-15) and Ctrl-C
    # printed a KeyboardInterrupt traceback from inside pyarrow's import
    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    out = tmp_path / "o.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "prefnoise", "corrupt", str(src), str(out), "--rate", "0.1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.25)  # importing polars, pyarrow and the CLI takes a second or more
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.count("\n") == 1 and "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


def test_a_working_directory_that_is_not_utf8_is_one_line_not_an_internal_error(tmp_path, monkeypatch):
    import os

    from tests.cli_helpers import assert_one_line_error, invoke

    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(odd)
    monkeypatch.chdir(os.fsdecode(odd))
    assert_one_line_error(invoke("corrupt", src, "o.parquet", "--rate", "0.1"), "current directory",
                          "caf\\xe9 is not valid UTF-8", "run prefnoise from another directory")
    assert os.listdir(odd) == []


def test_votes_read_as_text_accept_the_numbers_and_name_the_stray_value():
    import polars as pl

    from prefnoise.errors import PrefnoiseError
    from prefnoise.noise_audit.votes import CHOSEN, MISSING, REJECTED, TIE, vote_codes

    # a CSV vote column with one "nan" is read as strings: "1"/"-1"/"0"/"true" are still votes
    codes = vote_codes(pl.Series(["1", "-1", "0", " TRUE ", "false", None]), "vote")
    assert codes.tolist() == [CHOSEN, REJECTED, TIE, CHOSEN, REJECTED, MISSING]
    with pytest.raises(PrefnoiseError, match=r"column 'vote', row 3: vote 'nan' is not an accepted vote"):
        vote_codes(pl.Series(["1", "-1", "nan"]), "vote")


@pytest.mark.parametrize("value", ["/dev/zero", "subset"])
def test_a_config_name_before_the_command_is_refused_not_ignored(tmp_path, value):
    # before the command --config takes an options file; a hub config name there used to be dropped (exit 0)
    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    out = tmp_path / "noisy.csv"
    done = subprocess.run([sys.executable, "-m", "prefnoise", "--config", value, "corrupt", str(src), str(out),
                           "--rate", "0.1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip() == (
        f"Error: --config {value!r} before the command takes a .yaml/.yml options file; a hub dataset's config "
        "name goes after the command (prefnoise COMMAND DATA --config NAME)"
    )
