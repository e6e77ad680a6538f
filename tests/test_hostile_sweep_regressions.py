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


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``sig`` (Linux: the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/PID/status")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_libraries_load_exits_with_its_code_and_one_line(tmp_path, sig, code):
    # before, the CLI's handlers were not installed yet: SIGTERM killed the process raw (-15) and Ctrl-C
    # printed a KeyboardInterrupt traceback from inside pyarrow's import
    src = tmp_path / "pairs.csv"
    src.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(10)))
    out = tmp_path / "o.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "prefnoise", "corrupt", str(src), str(out), "--rate", "0.1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # prefnoise/__main__ has installed its startup handlers (SIGHUP's is the last): importing polars, pyarrow
    # and the CLI takes a second or more from here. (A fixed 0.25 s came before Python had even imported
    # `site` at load 6: the signal then ends the interpreter, before any prefnoise code; not this test's case.)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _catches(proc.pid, signal.SIGHUP) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.count("\n") == 1 and "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


# The command is done (a stand-in for prefnoise.cli, so no library loads); then a stop signal arrives in an
# atexit handler (Python handlers still active) or as __main__'s globals are freed (after Python put the
# default handlers back).
_SIGNAL_WHILE_EXITING = """
import atexit, os, signal, sys, types
sys.modules["prefnoise.cli"] = types.SimpleNamespace(main=lambda: sys.exit(int(sys.argv[2])))
from prefnoise.__main__ import run
class Late:
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=int(sys.argv[1])):
        kill(pid, sig)
late = Late()
atexit.register(os.kill, os.getpid(), int(sys.argv[1]))
run()
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 1), (signal.SIGHUP, 2)])
def test_a_signal_after_the_command_ended_keeps_its_exit_code(sig, code):
    # the sweep's fit-reward/audit/score at 2-9 s: the outputs were complete, then SIGINT/SIGTERM in the
    # second or more the interpreter takes to exit (unloading torch) ended the process raw, -2/-15, silently
    done = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_EXITING, str(int(sig)), str(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (code, "")


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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_never_replaces_a_finished_run_it_cannot_continue(tmp_path):
    from tests.cli_helpers import assert_one_line_error, invoke

    # before, fit-reward --resume on a run without checkpoints trained anew and replaced the finished model
    src, out = ROOT / "sample_data" / "pairs.parquet", tmp_path / "rm"
    fit = ("fit-reward", src, "--out", out, "--epochs", "1", "--hidden", "4")
    assert invoke(*fit).exit_code == 0
    before = _tree(out)
    assert_one_line_error(invoke(*fit, "--resume"), f"--resume: --out {out} holds an earlier `prefnoise fit-reward` "
                          "run with no checkpoint to continue", "pass --overwrite to replace it")
    assert _tree(out) == before
    fresh = invoke("fit-reward", src, "--out", tmp_path / "new", "--epochs", "1", "--hidden", "4", "--resume")
    assert fresh.exit_code == 0 and (tmp_path / "new" / "model.safetensors").is_file()  # nothing to lose: a new run


def test_check_resumable_accepts_a_run_with_a_checkpoint_and_a_new_directory(tmp_path):
    from prefnoise.errors import PrefnoiseError
    from prefnoise.training.runs import TRAINER_STATE, check_resumable

    check_resumable(tmp_path / "missing", "missing", "align")
    check_resumable(tmp_path, "empty", "align")
    with pytest.raises(PrefnoiseError, match=r"earlier `prefnoise align` run with no checkpoint to continue"):
        check_resumable(tmp_path, "ours", "align")
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(PrefnoiseError):  # a checkpoint half written (no trainer state) is none
        check_resumable(tmp_path, "ours", "align")
    (tmp_path / "checkpoints" / "step-2" / TRAINER_STATE).write_text("{}")
    check_resumable(tmp_path, "ours", "align")


_EXIT_AFTER_THE_COMMAND = """
import atexit, sys, threading, time, types
code = int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1]
sys.modules["prefnoise.cli"] = types.SimpleNamespace(main=lambda: sys.exit(code))
from prefnoise.__main__ import run
def late_writer():
    time.sleep(0.3)
    print("thread done", flush=True)
threading.Thread(target=late_writer).start()
atexit.register(print, "atexit ran")
sys.stdout.write("buffered, not flushed")
run()
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [("0", 0, ""), ("3", 3, ""), ("bad", 1, "bad\n")])
def test_the_process_ends_after_its_threads_and_atexit_handlers_with_the_commands_code(code, status, stderr):
    # end_process skips the interpreter's teardown (seconds of unloading torch; pyarrow's read-ahead thread
    # calling into it aborted the process), but not what a normal exit does first
    done = subprocess.run([sys.executable, "-c", _EXIT_AFTER_THE_COMMAND, code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr) == (status, stderr)
    assert done.stdout == "buffered, not flushedthread done\natexit ran\n"
