"""Destinations: prefnoise never removes or replaces what it did not create, and never writes over an input."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.data import write_table
from prefnoise.outputs import MARKER, check_output_dir, check_output_file, written_by_prefnoise
from prefnoise.reward.synthetic import feature_pairs
from tests.conftest import make_pairs

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def tree(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` with a digest of its bytes: the state to compare before and after."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def features_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("features") / "pairs.parquet"
    write_table(feature_pairs(200, seed=1), path)
    return path


@pytest.fixture
def text_path(tmp_path) -> Path:
    path = tmp_path / "text.parquet"
    make_pairs(30).write_parquet(path)
    return path


FIT = ("--epochs", "1", "--hidden", "8")


# --------------------------------------------------------------------------- directory outputs


def test_fit_reward_refuses_a_users_directory_and_leaves_it_intact(features_path, tmp_path):
    users = tmp_path / "project"
    users.mkdir()
    (users / "notes.txt").write_text("my only copy")
    shutil_copy = users / "data.parquet"
    shutil_copy.write_bytes(features_path.read_bytes())
    before = tree(users)
    for extra in ([], ["--overwrite"]):
        result = run("fit-reward", features_path, "--out", users, *FIT, *extra)
        assert result.exit_code == 2
        assert "not created by prefnoise" in one_error_line(result)
    assert tree(users) == before


def test_fit_reward_out_equal_to_its_input_is_refused(features_path, tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(features_path.read_bytes())
    before = data.read_bytes()
    result = run("fit-reward", data, "--out", data, *FIT, "--overwrite")
    assert result.exit_code == 2
    assert "is the input" in one_error_line(result)
    assert data.read_bytes() == before


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_fit_reward_refuses_cwd_and_its_ancestors(features_path, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    result = run("fit-reward", features_path, "--out", out, *FIT, "--overwrite")
    assert result.exit_code == 2
    assert "working directory" in one_error_line(result)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_fit_reward_refuses_an_ancestor_of_its_input_and_a_dir_inside_it(tmp_path, features_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.parquet").write_bytes(features_path.read_bytes())
    before = tree(tmp_path)
    result = run("fit-reward", shards / "part-0.parquet", "--out", tmp_path, *FIT, "--overwrite")
    assert result.exit_code == 2 and "contains the input" in one_error_line(result)
    result = run("fit-reward", shards, "--out", shards / "rm", *FIT)
    assert result.exit_code == 2 and "inside the input directory" in one_error_line(result)
    assert tree(tmp_path) == before


def test_fit_reward_replaces_only_its_own_output_and_only_with_overwrite(features_path, tmp_path):
    out = tmp_path / "rm"
    assert run("fit-reward", features_path, "--out", out, *FIT).exit_code == 0
    assert json.loads((out / MARKER).read_text())["command"] == "fit-reward"
    first = tree(out)
    result = run("fit-reward", features_path, "--out", out, *FIT, "--seed", "5")
    assert result.exit_code == 2 and "--overwrite" in one_error_line(result)
    assert tree(out) == first
    assert run("fit-reward", features_path, "--out", out, *FIT, "--seed", "5", "--overwrite").exit_code == 0
    assert tree(out) != first  # another seed, other weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no .rm.tmp-/.rm.old- leftovers


def test_an_empty_directory_is_a_fine_destination(features_path, tmp_path):
    out = tmp_path / "rm"
    out.mkdir()
    assert run("fit-reward", features_path, "--out", out, *FIT).exit_code == 0
    assert (out / "reward_config.json").is_file()


def test_another_commands_output_directory_is_not_replaced(features_path, tmp_path):
    out = tmp_path / "rm"
    assert run("fit-reward", features_path, "--out", out, *FIT).exit_code == 0
    before = tree(out)
    result = run("reproduce", "synthetic", "--out", out, "--quick", "--overwrite")
    assert result.exit_code == 2
    assert "prefnoise fit-reward" in one_error_line(result)
    assert tree(out) == before


def test_reproduce_refuses_a_users_directory_before_running(tmp_path):
    users = tmp_path / "results"
    users.mkdir()
    (users / "paper.tex").write_text("draft")
    result = run("reproduce", "alignment", "--out", users, "--quick", "--overwrite")
    assert result.exit_code == 2 and "not created by prefnoise" in one_error_line(result)
    assert (users / "paper.tex").read_text() == "draft"


def test_align_refuses_a_previous_run_without_resume_or_overwrite(tmp_path, text_path, lm_path):
    out = tmp_path / "aligned"
    args = ("align", text_path, "--model", lm_path, "--out", out, "--max-steps", "2", "--batch-size", "4",
            "--save-every", "1", "--log-every", "1")
    assert run(*args).exit_code == 0
    before = tree(out)
    assert any(name.startswith("checkpoints/") for name in before)
    result = run(*args)
    assert result.exit_code == 2
    assert "--overwrite" in one_error_line(result) and "--resume" in result.stderr
    assert tree(out) == before  # checkpoints and metrics untouched
    result = run(*args, "--resume", "--overwrite")
    assert result.exit_code == 2 and tree(out) == before


def test_align_refuses_a_foreign_directory_and_ref_cache(tmp_path, text_path, lm_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "a.txt").write_text("keep")
    result = run("align", text_path, "--model", lm_path, "--out", users, "--max-steps", "1")
    assert result.exit_code == 2 and "not created by prefnoise" in one_error_line(result)
    mine = tmp_path / "mine.parquet"
    make_pairs(3).write_parquet(mine)  # a Parquet file prefnoise did not write
    before = mine.read_bytes()
    result = run("align", text_path, "--model", lm_path, "--out", tmp_path / "new", "--ref-cache", mine,
                 "--max-steps", "1")
    assert result.exit_code == 2 and "not written by prefnoise" in one_error_line(result)
    assert mine.read_bytes() == before and not (tmp_path / "new").exists()


def test_failed_align_before_a_checkpoint_leaves_nothing(tmp_path, text_path, lm_path, monkeypatch):
    """An interruption after align created --out: the directory is removed again and the message is true."""
    import prefnoise.policy.trainer as A

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "save_final_model", interrupted)
    out = tmp_path / "aligned"
    result = run("align", text_path, "--model", lm_path, "--out", out, "--max-steps", "1", "--batch-size", "4")
    assert result.exit_code == 130
    assert "no output was written" in result.stderr
    assert not out.exists()


def test_failed_align_keeps_checkpoints_and_says_so(tmp_path, text_path, lm_path, monkeypatch):
    import prefnoise.policy.trainer as A

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "save_final_model", interrupted)
    out = tmp_path / "aligned"
    result = run("align", text_path, "--model", lm_path, "--out", out, "--max-steps", "2", "--batch-size", "4",
                 "--save-every", "1")
    assert result.exit_code == 130
    assert "checkpoints" in result.stderr and "--resume" in result.stderr
    assert "no output was written" not in result.stderr
    assert (out / "checkpoints").is_dir()


# --------------------------------------------------------------------------- file outputs


@pytest.mark.parametrize("command", ["corrupt", "score", "audit"])
def test_out_equal_to_input_is_refused_and_the_input_is_untouched(tmp_path, features_path, command):
    data = tmp_path / "data.parquet"
    data.write_bytes(features_path.read_bytes())
    before = data.read_bytes()
    model = tmp_path / "rm"
    if command == "score":
        assert run("fit-reward", data, "--out", model, *FIT).exit_code == 0
    args = {
        "corrupt": ("corrupt", data, data, "--rate", "0.2", "--overwrite"),
        "score": ("score", model, data, data, "--overwrite"),
        "audit": ("audit", data, "--out", data, "--fix", "drop", "--folds", "2", "--epochs", "1", "--overwrite"),
    }[command]
    result = run(*args)
    assert result.exit_code == 2 and "is the input" in one_error_line(result)
    assert data.read_bytes() == before


def test_links_to_the_input_are_caught(tmp_path, sample_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(sample_path.read_bytes())
    before = data.read_bytes()
    (tmp_path / "soft.parquet").symlink_to(data)
    os.link(data, tmp_path / "hard.parquet")
    for alias in ("soft.parquet", "hard.parquet"):
        result = run("corrupt", data, tmp_path / alias, "--rate", "0.2", "--overwrite")
        assert result.exit_code == 2 and "is the input" in one_error_line(result)
    assert data.read_bytes() == before


def test_existing_outputs_need_overwrite_and_foreign_files_are_never_replaced(tmp_path, sample_path):
    out = tmp_path / "noisy.parquet"
    assert run("corrupt", sample_path, out, "--rate", "0.2").exit_code == 0
    assert written_by_prefnoise(out)
    first = out.read_bytes()
    result = run("corrupt", sample_path, out, "--rate", "0.3")
    assert result.exit_code == 2 and "--overwrite" in one_error_line(result)
    assert out.read_bytes() == first
    assert run("corrupt", sample_path, out, "--rate", "0.3", "--overwrite").exit_code == 0
    assert out.read_bytes() != first

    foreign = tmp_path / "theirs.parquet"
    make_pairs(5).write_parquet(foreign)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path in (foreign, notes):
        before = path.read_bytes()
        result = run("corrupt", sample_path, path, "--rate", "0.2", "--overwrite")
        assert result.exit_code == 2 and "not written by prefnoise" in one_error_line(result)
        assert path.read_bytes() == before


def test_plot_files_follow_the_same_policy(tmp_path, sample_path):
    scored = tmp_path / "scored.parquet"
    frame = pl.read_parquet(sample_path)
    write_table(frame.with_columns(chosen_reward=pl.col("chosen_score"), rejected_reward=pl.col("rejected_score")),
                scored)
    png = tmp_path / "fig.png"
    args = ("rank-check", scored, "--plot", png, "--bootstrap", "0")
    assert run(*args).exit_code == 0 and written_by_prefnoise(png)
    result = run(*args)
    assert result.exit_code == 2 and "--overwrite" in one_error_line(result)
    assert run(*args, "--overwrite").exit_code == 0
    photo = tmp_path / "holiday.png"
    photo.write_bytes(png.read_bytes().replace(b"prefnoise", b"something"))  # a PNG from elsewhere
    before = photo.read_bytes()
    result = run("rank-check", scored, "--plot", photo, "--overwrite")
    assert result.exit_code == 2 and "not written by prefnoise" in one_error_line(result)
    assert photo.read_bytes() == before


@pytest.mark.parametrize(
    ("make_dest", "message"),
    [
        (lambda t: t / "adir", "is a directory"),
        (lambda t: t / "afile" / "out.parquet", "is not a directory"),
        (lambda t: Path(" "), "empty"),
    ],
)
def test_unusable_output_paths_are_one_line(tmp_path, sample_path, make_dest, message):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    result = run("corrupt", sample_path, make_dest(tmp_path), "--rate", "0.2")
    assert result.exit_code == 2 and message in one_error_line(result)
    assert (tmp_path / "afile").read_text() == "x" and not any((tmp_path / "adir").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_one_line(tmp_path, sample_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run("corrupt", sample_path, locked / "o.parquet", "--rate", "0.2")
        assert result.exit_code == 2 and "permission denied" in one_error_line(result).lower()
    finally:
        locked.chmod(0o755)


def test_an_unwritable_location_is_one_line_even_for_root(sample_path):
    result = run("corrupt", sample_path, "/proc/prefnoise-test/o.parquet", "--rate", "0.2")
    assert result.exit_code == 2
    one_error_line(result)


def _corrupt_subprocess(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "prefnoise", *map(str, args)], stderr=subprocess.PIPE, env=env,
                          timeout=120, **kwargs)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, sample_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past 4 KiB fail (EFBIG) like ENOSPC would."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "o.parquet"
    done = _corrupt_subprocess(["corrupt", sample_path, out, "--rate", "0.2"], preexec_fn=limit)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "too large" in stderr.lower() or "no space" in stderr.lower()
    assert list(tmp_path.iterdir()) == []


def test_dev_full_on_stdout_is_one_line(sample_path):
    with open("/dev/full", "wb") as full:
        done = _corrupt_subprocess(["corrupt", sample_path, "-", "--rate", "0.2"], stdout=full)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and "standard output" in stderr


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, features_path, mask):
    def with_umask():
        os.umask(mask)

    out = tmp_path / "noisy.parquet"
    rm = tmp_path / "rm"
    assert _corrupt_subprocess(["corrupt", features_path, out, "--rate", "0.2"], preexec_fn=with_umask).returncode == 0
    assert _corrupt_subprocess(["fit-reward", out, "--out", rm, *FIT], preexec_fn=with_umask).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(rm.stat().st_mode) == 0o777 & ~mask


def test_library_writers_share_the_policy(tmp_path):
    frame = make_pairs(5)
    path = tmp_path / "t.parquet"
    write_table(frame, path)
    with pytest.raises(Exception, match="--overwrite"):
        write_table(frame, path)
    write_table(frame, path, overwrite=True)
    foreign = tmp_path / "f.parquet"
    frame.write_parquet(foreign)
    with pytest.raises(Exception, match="not written by prefnoise"):
        write_table(frame, foreign, overwrite=True)
    check_output_file("-")  # stdout is always a fine destination
    assert check_output_dir(tmp_path / "new", command="fit-reward") == "missing"


@pytest.mark.parametrize("name", ["out.json", "out.txt", "out.parquet.gz"])
def test_a_table_is_never_written_under_another_formats_name(tmp_path, sample_path, name):
    # .parquet/.jsonl/.csv write that format (tests/test_output_formats.py); any other name is refused
    result = run("corrupt", sample_path, tmp_path / name, "--rate", "0.2")
    assert result.exit_code == 2 and "unknown table format" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []
