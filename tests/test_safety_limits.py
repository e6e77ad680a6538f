"""Bounded resources and OS limits, with real processes: absurd option values, memory estimates, config files,
wide tables, ulimit -v and -f, closed stdout, broken pipes, non-UTF-8 names, warnings (issue 22,
README "Resource limits")."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import polars as pl
import pytest

from prefnoise.describe import column_stats
from prefnoise.options import OPTION_RANGES, OptionError, check_option
from prefnoise.resources import mlp_parameters, resource_limit_message

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pairs.parquet"


def run(args, tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python -m prefnoise ARGS`` to completion, from ``tmp`` (``args`` may hold bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFNOISE_DEBUG": ""}
    argv = [sys.executable, "-m", "prefnoise", *(a if isinstance(a, bytes) else str(a) for a in args)]
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(argv, env=env, cwd=tmp, timeout=300, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --------------------------------------------------------------------------- upper bounds

BOUNDED = sorted(name for name, rule in OPTION_RANGES.items() if rule[2] is not None)


@pytest.mark.parametrize("name", BOUNDED)
def test_every_upper_bound_refuses_the_value_above_it_and_takes_the_bound(name):
    low, low_in, high, high_in = OPTION_RANGES[name]
    above = high * 10 if high > 1 else high + 1
    if isinstance(high, int):
        above = int(above)
    with pytest.raises(OptionError, match="must be"):
        check_option(name, above)
    if high_in:
        check_option(name, high)


@pytest.mark.parametrize("name", ["epochs", "bootstrap", "layers", "hidden", "grad_accum", "batch_size", "lr",
                                  "folds", "seeds", "max_steps", "max_length"])
def test_the_absurd_values_of_the_sweep_have_a_bound(name):
    assert OPTION_RANGES[name][2] is not None


def test_a_capped_option_names_only_the_side_crossed():
    with pytest.raises(OptionError, match=r"^epochs= must be >= 1, got 0$"):
        check_option("epochs", 0)
    with pytest.raises(OptionError, match=r"^epochs= must be <= 1000000, got 1000001$"):
        check_option("epochs", 1_000_001)
    with pytest.raises(OptionError, match=r"^rate= must be in \[0, 1\], got 2$"):
        check_option("rate", 2)  # a natural range keeps its two sides


@pytest.mark.parametrize(("args", "message"), [
    (["fit-reward", SAMPLE, "--out", "rm", "--epochs", "99999999999999999999999"],
     "Error: --epochs must be <= 1000000, got 9.999e+22"),
    (["fit-reward", SAMPLE, "--out", "rm", "--lr", "1e300"], "Error: --lr must be <= 1e+30, got 1e+300"),
    (["fit-reward", SAMPLE, "--out", "rm", "--hidden", "100000000000"],
     "Error: --hidden must be <= 65536, got 100000000000"),
    (["align", SAMPLE, "--model", "m", "--out", "a", "--grad-accum", "100000000000"],
     "Error: --grad-accum must be <= 65536, got 100000000000"),
])
def test_absurd_values_fail_at_once_in_one_line(tmp_path, args, message):
    result = run(args, tmp_path)
    assert result.returncode == 2
    assert error_line(result) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mlp_parameters_by_hand():
    # in 3, two hidden layers of 4, one output: 3*4+4 + 4*4+4 + 4+1
    assert mlp_parameters(3, 4, 2) == 41
    assert mlp_parameters(3, 4, 0) == 4  # a linear model: 3 weights and a bias


def test_an_mlp_that_cannot_fit_in_memory_is_refused_with_its_estimate(tmp_path):
    result = run(["fit-reward", SAMPLE, "--out", "rm", "--hidden", "65536", "--layers", "1000", "-q"], tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert "(4,290,738,978,817 parameters) needs about 68.7 TB of memory to train" in line
    assert line.endswith("lower --hidden or --layers")
    assert not (tmp_path / "rm").exists()


# --------------------------------------------------------------------------- config files

def _config_run(tmp: Path, config: Path) -> subprocess.CompletedProcess:
    return run(["corrupt", SAMPLE, "o.parquet", "--config", config], tmp)


def test_a_config_that_links_to_an_endless_device_is_refused_without_reading(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    result = _config_run(tmp_path, tmp_path / "zero.yaml")
    assert result.returncode == 2
    assert "is not a regular file (a device, FIFO or socket)" in error_line(result)


def test_a_fifo_config_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "f.yaml")
    result = _config_run(tmp_path, tmp_path / "f.yaml")
    assert result.returncode == 2
    assert "is not a regular file" in error_line(result)


def test_a_config_over_1_mb_is_refused(tmp_path):
    (tmp_path / "big.yaml").write_text("rate: 0.1\n" + "#" * (1 << 20))
    result = _config_run(tmp_path, tmp_path / "big.yaml")
    assert result.returncode == 2
    assert "is larger than 1 MB" in error_line(result)


@pytest.mark.parametrize(("text", "fragment"), [
    ("rate: " + "[" * 20000, "nested too deeply"),
    ("rate: [[0.1]]\n", "must be a value or a list of values"),
])
def test_nested_config_values_are_refused(tmp_path, text, fragment):
    (tmp_path / "c.yaml").write_text(text)
    result = _config_run(tmp_path, tmp_path / "c.yaml")
    assert result.returncode == 2
    assert fragment in error_line(result)


# --------------------------------------------------------------------------- wide tables

def test_column_stats_is_linear_in_columns():
    frame = pl.DataFrame({f"c{i}": [i, i + 1] for i in range(10_000)})
    started = time.perf_counter()
    stats = column_stats(frame)
    elapsed = time.perf_counter() - started
    assert len(stats) == 10_000
    assert stats[9_999] == {"column": "c9999", "dtype": "Int64", "nulls": 0, "mean": 9999.5,
                            "std": pytest.approx(0.7071067811865476), "min": 9999.0, "max": 10000.0}
    assert elapsed < 30, elapsed  # the quadratic version took minutes


def test_inspect_json_on_10000_columns_finishes(tmp_path):
    data = {"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}
    data.update({f"c{i}": [i, i] for i in range(10_000)})
    pl.DataFrame(data).write_parquet(tmp_path / "wide.parquet")
    result = run(["inspect", "wide.parquet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["columns"]) == 10_003


# --------------------------------------------------------------------------- OS limits

def _limit(kind: int, value: int):
    return lambda: resource.setrlimit(kind, (value, resource.getrlimit(kind)[1]))


def test_a_too_small_address_space_limit_is_one_line(tmp_path):
    result = run(["corrupt", SAMPLE, "o.parquet", "--rate", "0.1"], tmp_path,
                 preexec_fn=_limit(resource.RLIMIT_AS, 1 << 30))
    assert result.returncode == 2
    assert error_line(result).startswith("Error: the address-space limit (ulimit -v) is 1.1 GB; prefnoise needs at")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("can't start new thread"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 1 bytes")])
def test_out_of_memory_errors_read_as_such(error):
    assert resource_limit_message(error).startswith("out of memory (")


def test_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    result = run(["corrupt", SAMPLE, "o.parquet", "--rate", "0.1"], tmp_path,
                 preexec_fn=_limit(resource.RLIMIT_FSIZE, 20_000))
    assert result.returncode == 2
    line = error_line(result)
    assert ("file too large: it grew past the file-size limit while being written; "
            "the limit (ulimit -f) is 20.0 KB") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_file_size_limit_while_torch_writes_a_checkpoint_is_one_line(tmp_path):
    result = run(["fit-reward", SAMPLE, "--out", "rm", "--epochs", "2", "--save-every", "1", "-q"], tmp_path,
                 preexec_fn=_limit(resource.RLIMIT_FSIZE, 8_000))
    assert result.returncode == 2
    assert "file-size limit" in error_line(result)


def test_a_closed_stdout_fails_in_one_line_and_never_lands_in_a_file(tmp_path):
    close_stdout = lambda: os.close(1)  # noqa: E731  (the shell's >&-)
    result = run(["inspect", SAMPLE], tmp_path, preexec_fn=close_stdout, stdout=None, stderr=subprocess.PIPE)
    assert result.returncode == 2
    assert error_line(result) == ("Error: cannot write to standard output: it is closed (>&-); "
                                  "redirect it instead (>/dev/null)")
    quiet = run(["corrupt", SAMPLE, "o.parquet", "--rate", "0.1", "-q"], tmp_path, preexec_fn=close_stdout,
                stdout=None, stderr=subprocess.PIPE)
    assert quiet.returncode == 0, quiet.stderr
    assert pl.read_parquet(tmp_path / "o.parquet").height == 400


def test_a_broken_pipe_exits_141(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFNOISE_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "prefnoise", "inspect", str(SAMPLE)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the report is written (| head -c 0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err == b""


def test_a_non_utf8_file_name_is_shown_escaped(tmp_path):
    name = b"\xff\xfe.parquet"
    (tmp_path / os.fsdecode(name)).write_bytes(SAMPLE.read_bytes())
    result = run(["inspect", name], tmp_path)
    assert result.returncode == 2
    assert error_line(result).startswith(r"Error: \xff\xfe.parquet: the name is not valid UTF-8")


def test_a_trailing_slash_names_a_directory_not_a_file(tmp_path):
    result = run(["corrupt", SAMPLE, "newdir/", "--rate", "0.1"], tmp_path)
    assert result.returncode == 2
    assert "ends with '/', which names a directory" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_library_warnings_stay_off_stderr_unless_debug(monkeypatch):
    from prefnoise.cli.common import cli_errors

    def command() -> int:
        warnings.warn_explicit("weights_only=False is unsafe", FutureWarning, "torch/serialization.py", 1,
                               module="torch.serialization")
        return 7

    monkeypatch.delenv("PREFNOISE_DEBUG", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli_errors(command)() == 7
    assert seen == []
    monkeypatch.setenv("PREFNOISE_DEBUG", "1")
    with pytest.warns(FutureWarning, match="weights_only=False is unsafe"):
        assert cli_errors(command)() == 7
