"""Concurrent runs, with real processes: one lock per output, no replacing after the check, ownership by
manifest, and what a killed run leaves behind (issue 22, README "Concurrent runs")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from prefnoise.atomic import rename_noreplace
from prefnoise.locks import lock_file_of
from prefnoise.outputs import MARKER, check_output_dir, manifest_problems, release_claims, write_marker

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    temp = tmp / "TMP"
    temp.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp), "PREFNOISE_DEBUG": ""}


def run(args, tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python -m prefnoise ARGS`` to completion, from ``tmp``."""
    return subprocess.run([sys.executable, "-m", "prefnoise", *map(str, args)], env=_env(tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=300, **kwargs)


def start(args, tmp: Path) -> subprocess.Popen:
    """``python -m prefnoise ARGS`` in the background, reading its input from a pipe we hold open."""
    return subprocess.Popen([sys.executable, "-m", "prefnoise", *map(str, args)], env=_env(tmp), cwd=tmp,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the first run to claim its output")
        time.sleep(0.01)


def holds(out: Path) -> bool:
    """Whether some run holds the lock of ``out`` (its lock file names a pid)."""
    try:
        return lock_file_of(out).read_text().startswith("prefnoise pid ")
    except OSError:
        return False


def reading_stdin(tmp: Path) -> bool:
    """Whether a run started by :func:`start` in ``tmp`` has begun copying its stdin, which it does only after
    checking its output: holding the lock alone does not say the check is over (it is taken just before)."""
    return any((tmp / "TMP").glob("prefnoise-stdin-*"))


def feed(proc: subprocess.Popen, data: bytes) -> tuple[int, str]:
    _, err = proc.communicate(data, timeout=300)
    return proc.returncode, err.decode()


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, sample_path_module) -> Path:
    """A finished `fit-reward --out` directory (copied by each test that changes it)."""
    tmp = tmp_path_factory.mktemp("fitted")
    result = run(["fit-reward", sample_path_module, "--out", tmp / "rm", "--epochs", "1", "-q"], tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "rm"


@pytest.fixture(scope="module")
def sample_path_module() -> Path:
    return ROOT / "sample_data" / "pairs.parquet"


# --------------------------------------------------------------------------- one lock per output

def test_a_second_corrupt_on_the_same_out_exits_2_naming_the_first_runs_pid(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    first = start(["corrupt", "-", out, "--rate", "0.2", "-q"], tmp_path)
    wait_for(lambda: holds(out), first)
    second = run(["corrupt", sample_path, out, "--rate", "0.2", "-q"], tmp_path)
    assert second.returncode == 2
    assert one_line(second.stderr) == f"Error: OUT {out}: in use by another prefnoise run (pid {first.pid})"
    code, err = feed(first, sample_path.read_bytes())
    assert code == 0, err
    assert pl.read_parquet(out).height == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TMP", "noisy.parquet"]  # the lock file is gone


def test_a_second_fit_reward_on_the_same_out_exits_2_and_the_first_is_unharmed(tmp_path, sample_path):
    out = tmp_path / "rm"
    first = start(["fit-reward", "-", "--out", out, "--epochs", "1", "-q"], tmp_path)
    wait_for(lambda: holds(out), first)
    second = run(["fit-reward", sample_path, "--out", out, "--epochs", "1", "--overwrite", "-q"], tmp_path)
    assert second.returncode == 2
    assert one_line(second.stderr) == f"Error: --out {out}: in use by another prefnoise run (pid {first.pid})"
    code, err = stop(first)
    assert code == 143, err
    assert not out.exists() and not lock_file_of(out).exists()


def test_a_run_killed_with_sigkill_leaves_a_stale_lock_the_next_run_takes_over(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    first = start(["corrupt", "-", out, "--rate", "0.2", "-q"], tmp_path)
    wait_for(lambda: holds(out), first)
    first.kill()
    first.communicate(timeout=60)
    assert lock_file_of(out).read_text() == f"prefnoise pid {first.pid}\n"  # left behind by the dead run
    again = run(["corrupt", sample_path, out, "--rate", "0.2", "-q"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"earlier prefnoise run (pid {first.pid}) ended without releasing it" in one_line(again.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TMP", "noisy.parquet"]


@pytest.fixture(scope="module")
def big_pairs(tmp_path_factory) -> Path:
    """200k pairs: large enough that corrupt is still writing when it is killed."""
    n = 200_000
    frame = pl.DataFrame({
        "prompt": [f"prompt {i // 4}" for i in range(n)],
        "chosen": [f"chosen answer {i} with some words" for i in range(n)],
        "rejected": [f"rejected answer {i} with some words" for i in range(n)],
        "chosen_score": np.random.default_rng(0).normal(size=n),
        "rejected_score": np.random.default_rng(1).normal(size=n),
    })
    path = tmp_path_factory.mktemp("big") / "pairs.parquet"
    frame.write_parquet(path)
    return path


def test_kill_9_mid_write_then_a_rerun_removes_the_dead_runs_temporary_file(tmp_path, big_pairs, sample_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "noisy.parquet"
    first = subprocess.Popen([sys.executable, "-m", "prefnoise", "corrupt", str(big_pairs), str(out), "--rate", "0.2"],
                             env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writing = lambda: any(p.name.startswith(".noisy.parquet.tmp-") for p in out_dir.iterdir())  # noqa: E731
    wait_for(writing, first)
    first.kill()
    first.communicate(timeout=60)
    stale = sorted(p.name for p in out_dir.iterdir())
    assert any(name.startswith(f".noisy.parquet.tmp-{first.pid}-") for name in stale), stale
    again = run(["corrupt", sample_path, out, "--rate", "0.2", "-q"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "removed 1 temporary file(s) that a killed prefnoise run left beside" in again.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["noisy.parquet"]


def test_align_runs_on_one_out_with_and_without_resume_exit_2_while_one_runs(tmp_path, lm_path, sample_path):
    out = tmp_path / "run"
    common = ["--model", lm_path, "--out", out, "--max-steps", "1", "--device", "cpu", "-q"]
    first = start(["align", "-", *common, "--resume"], tmp_path)
    wait_for(lambda: holds(out), first)
    env = _env(tmp_path)
    argv = [sys.executable, "-m", "prefnoise", "align", str(sample_path), *map(str, common)]
    others = [subprocess.Popen(argv + extra, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for extra in ([], ["--resume"])]
    for other in others:
        _, err = other.communicate(timeout=300)
        assert other.returncode == 2
        assert one_line(err) == f"Error: --out {out}: in use by another prefnoise run (pid {first.pid})"
    code, err = stop(first)
    assert code == 143, err
    assert not lock_file_of(out).exists()


def test_stale_temporaries_of_dead_runs_are_removed_and_unknown_ones_named(tmp_path, capsys):
    from prefnoise.locks import clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.parquet.tmp-{pid}-abcd1234").write_text("half")
    (tmp_path / f".out.parquet.tmp-{os.getpid()}-abcd1234").write_text("ours, still running")
    (tmp_path / ".out.parquet.tmp-k3j4h5g6").write_text("an older run's")
    (tmp_path / ".other.parquet.tmp-1-abcd1234").write_text("another output's")
    clean_stale_temporaries(tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        ".other.parquet.tmp-1-abcd1234", ".out.parquet.tmp-k3j4h5g6", f".out.parquet.tmp-{os.getpid()}-abcd1234"])
    err = capsys.readouterr().err
    assert f"removed 1 temporary file(s) that a killed prefnoise run left beside {tmp_path / 'out.parquet'}" in err
    assert "lie temporary files of an earlier prefnoise run: .out.parquet.tmp-k3j4h5g6" in err


# --------------------------------------------------------------------------- no replacing after the check

def test_a_file_created_at_out_mid_run_is_kept_and_the_result_left_beside_it(tmp_path, big_pairs):
    out = tmp_path / "noisy.parquet"
    first = subprocess.Popen([sys.executable, "-m", "prefnoise", "corrupt", str(big_pairs), str(out), "--rate", "0.2"],
                             env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writing = lambda: any(p.name.startswith(".noisy.parquet.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    wait_for(writing, first)
    out.write_bytes(b"the user's own file\n")  # appears after the check, while the result is being written
    _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    beside = tmp_path / "noisy.prefnoise-result.parquet"
    assert one_line(err.decode()) == (
        f"Error: {out}: appeared while prefnoise ran (this run did not write it); it was kept, "
        f"and this run's result was written to {beside} instead"
    )
    assert out.read_bytes() == b"the user's own file\n"
    assert pl.read_parquet(beside).height == 200_000


def test_a_file_created_at_out_before_the_write_starts_is_refused(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    first = start(["corrupt", "-", out, "--rate", "0.2", "-q"], tmp_path)
    wait_for(lambda: holds(out) and reading_stdin(tmp_path), first)
    out.write_bytes(b"the user's own file\n")
    code, err = feed(first, sample_path.read_bytes())
    assert code == 2
    assert "exists and was not written by prefnoise" in one_line(err)
    assert out.read_bytes() == b"the user's own file\n"


def test_a_file_added_to_the_out_directory_mid_run_is_kept(tmp_path, sample_path):
    out = tmp_path / "rm"
    first = start(["fit-reward", "-", "--out", out, "--epochs", "1", "-q"], tmp_path)
    wait_for(lambda: holds(out) and reading_stdin(tmp_path), first)
    out.mkdir()
    (out / "NOTES.md").write_text("mine\n")
    code, err = feed(first, sample_path.read_bytes())
    assert code == 2
    assert "it was kept, and this run's result was written to" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md"]
    assert manifest_problems(tmp_path / "rm.prefnoise-result") == []  # the whole result, marked as prefnoise's


def test_rename_noreplace_never_replaces(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("new")
    dst.write_text("user")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert dst.read_text() == "user" and src.read_text() == "new"
    dst.unlink()
    rename_noreplace(src, dst)
    assert dst.read_text() == "new" and not src.exists()


# --------------------------------------------------------------------------- ownership by manifest

def test_overwrite_refuses_a_directory_holding_a_users_file_and_deletes_nothing(tmp_path, fitted, sample_path):
    out = tmp_path / "rm"
    shutil.copytree(fitted, out)
    (out / "NOTES.md").write_text("my notes\n")
    before = sorted(p.name for p in out.iterdir())
    result = run(["fit-reward", sample_path, "--out", out, "--epochs", "1", "--overwrite", "-q"], tmp_path)
    assert result.returncode == 2
    assert "NOTES.md (not written by prefnoise)" in one_line(result.stderr)
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "NOTES.md").read_text() == "my notes\n"


def test_overwrite_refuses_when_a_listed_file_changed_since(tmp_path, fitted, sample_path):
    out = tmp_path / "rm"
    shutil.copytree(fitted, out)
    metrics = out / "metrics.json"
    metrics.write_text(metrics.read_text() + " ")
    result = run(["fit-reward", sample_path, "--out", out, "--epochs", "1", "--overwrite", "-q"], tmp_path)
    assert result.returncode == 2
    assert "metrics.json (changed since prefnoise wrote it)" in one_line(result.stderr)
    assert metrics.read_text().endswith(" ")


def test_overwrite_replaces_an_unchanged_earlier_output(tmp_path, fitted, sample_path):
    out = tmp_path / "rm"
    shutil.copytree(fitted, out)
    result = run(["fit-reward", sample_path, "--out", out, "--epochs", "1", "--overwrite", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert manifest_problems(out) == []


def test_a_hand_made_marker_does_not_get_a_users_files_deleted(tmp_path, sample_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n")
    (out / MARKER).write_text(json.dumps({"command": "fit-reward"}))
    result = run(["fit-reward", sample_path, "--out", out, "--epochs", "1", "--overwrite", "-q"], tmp_path)
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        f"Error: --out {out}: holds files prefnoise did not write or that changed since: {MARKER} lists no files "
        "(made by hand, or by an earlier prefnoise version); prefnoise will not replace it, give a new directory"
    )
    assert (out / "data.csv").read_text() == "a,b\n"


@pytest.mark.parametrize(("marker", "problem"), [
    ({"command": "fit-reward", "live": True, "files": {}}, "data.csv (not written by prefnoise)"),
    ({"command": "fit-reward", "files": {"data.csv": {"size": 4, "sha256": "0" * 64}}},
     "data.csv (changed since prefnoise wrote it)"),
])
def test_a_forged_manifest_that_does_not_match_is_no_ownership(tmp_path, marker, problem):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n")
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="prefnoise will not replace it") as error:
        check_output_dir(out, command="fit-reward", overwrite=True)
    assert problem in str(error.value)
    assert not lock_file_of(out).exists()  # a refused check holds nothing


def test_manifest_lists_path_size_and_sha256(tmp_path):
    out = tmp_path / "d"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "x.txt").write_text("abc")
    write_marker(out, "fit-reward", live=False)
    files = json.loads((out / MARKER).read_text())["files"]
    assert files == {"sub/x.txt": {"size": 3,
                                   "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}
    assert manifest_problems(out) == []
    (out / "sub" / "y.txt").write_text("")
    assert manifest_problems(out) == ["sub/y.txt (not written by prefnoise)"]


def test_a_sub_directory_that_cannot_be_listed_is_no_ownership(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    write_marker(out, "fit-reward", live=False)
    (out / "private").mkdir()
    (out / "private" / "secret.txt").write_text("x")
    (out / "private").chmod(0)
    try:
        if os.access(out / "private", os.R_OK):
            pytest.skip("running as a user that reads everything")
        assert manifest_problems(out) == ["private (cannot be listed)"]
    finally:
        (out / "private").chmod(0o755)


def test_a_live_run_directory_owns_what_training_keeps_writing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_marker(out, "align")
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "w.pt").write_bytes(b"1")
    (out / "metrics.jsonl").write_text("{}\n")
    assert manifest_problems(out) == []
    (out / "NOTES.md").write_text("x")
    assert manifest_problems(out) == ["NOTES.md (not written by prefnoise)"]


def test_claims_are_reentrant_within_a_process_and_released(tmp_path):
    out = tmp_path / "d"
    assert check_output_dir(out, command="fit-reward") == "missing"
    assert check_output_dir(out, command="fit-reward") == "missing"
    assert lock_file_of(out).exists()
    release_claims()
    assert not lock_file_of(out).exists()
