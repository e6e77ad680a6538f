"""The engine plumbing of --engine ray: its options, Ray as an optional extra, blocks through Ray Data in
input order, and inputs/outputs named by filesystem URIs with the local safety rules."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from prefnoise.engine import (
    RAY_MISSING,
    BlockFailed,
    is_remote,
    local_path,
    map_blocks,
    readable_path,
    uri_scheme,
    writable_path,
)
from prefnoise.engine.session import RAY_OUTPUT, quiet_ray_warnings
from prefnoise.errors import PrefnoiseError
from prefnoise.options import EngineOptions, OptionError
from tests.ray_helpers import RAY_CPUS, Scaler, ray_test, tag_block

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("ray")  # the whole module on the worker holding the one local Ray


# --------------------------------------------------------------------------- options


def test_engine_options_default_to_one_process_and_check_their_fields():
    assert EngineOptions() == EngineOptions(engine="local", ray_address=None, workers=None)
    assert not EngineOptions().distributed and EngineOptions(engine="ray").distributed
    with pytest.raises(OptionError, match=r"^engine= must be one of: local, ray; got 'spark'"):
        EngineOptions(engine="spark")
    with pytest.raises(OptionError) as caught:
        EngineOptions(workers=2)
    assert caught.value.as_flag() == "--workers applies to --engine=ray only (got engine 'local')"
    with pytest.raises(OptionError, match=r"^workers= must be >= 1, got 0"):
        EngineOptions(engine="ray", workers=0)
    with pytest.raises(OptionError, match="ray_address= is empty"):
        EngineOptions(engine="ray", ray_address=" ")


# --------------------------------------------------------------------------- Ray is optional

_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # import ray raises ImportError, as where the extra is not installed
from prefnoise.engine import require_ray
from prefnoise.errors import PrefnoiseError
try:
    require_ray()
except PrefnoiseError as error:
    print(error.exit_code, error.message)
"""


def test_without_ray_the_engine_is_a_one_line_error_naming_the_extra():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_RAY], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"2 {RAY_MISSING}"
    assert RAY_MISSING == "--engine ray needs Ray: pip install 'prefnoise[ray]'"


def test_importing_the_package_does_not_import_ray():
    code = "import sys, prefnoise, prefnoise.engine, prefnoise.api; print('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# --------------------------------------------------------------------------- blocks through Ray Data


@ray_test
def test_blocks_come_back_in_input_order_with_their_offsets(ray_cluster):
    assert ray_cluster.workers == RAY_CPUS
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # more blocks than one window of 4 per worker
    frames, start = [], 0
    for size in sizes:
        frames.append(pl.DataFrame({"a": list(range(start, start + size))}))
        start += size
    results = list(map_blocks(ray_cluster, frames, tag_block))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    assert results == [(f["a"].to_list(), i, offsets[i]) for i, f in enumerate(frames)]
    assert list(map_blocks(ray_cluster, frames, tag_block, window=None)) == results  # one execution
    scaled = list(map_blocks(ray_cluster, frames[:3], Scaler, setup=(10,)))
    assert scaled == [[0, 10, 20], [30], [40, 50, 60, 70]]


@ray_test
def test_a_prefnoise_error_in_a_block_is_raised_on_the_driver_at_its_block(ray_cluster):
    frames = [pl.DataFrame({"a": [1]}), pl.DataFrame({"a": []}, schema={"a": pl.Int64}), pl.DataFrame({"a": []})]
    results = map_blocks(ray_cluster, frames, tag_block)
    with pytest.raises(PrefnoiseError, match=r"^block 1 is empty$") as caught:
        list(results)
    assert caught.value.exit_code == 2
    with pytest.raises(BlockFailed, match=r"^block 1: ZeroDivisionError: integer division or modulo by zero$"):
        list(map_blocks(ray_cluster, [frames[0], pl.DataFrame({"a": [-1]})], tag_block))


# --------------------------------------------------------------------------- URIs


def test_uri_schemes_and_local_paths():
    assert uri_scheme("s3://bucket/pairs.parquet") == "s3" and is_remote("s3://bucket/pairs.parquet")
    assert uri_scheme("pairs.parquet") is None and not is_remote("pairs.parquet")
    assert uri_scheme("file:///tmp/a%20b.jsonl") == "file" and not is_remote("file:///tmp/a%20b.jsonl")
    assert local_path("file:///tmp/a%20b.jsonl") == "/tmp/a b.jsonl"
    assert local_path("C:/data/x.csv") == "C:/data/x.csv"


@pytest.fixture
def memfs(tmp_path, monkeypatch):
    """``mem://NAME`` URIs backed by a directory (a remote filesystem for the tests, through pyarrow.fs)."""
    root = tmp_path / "bucket"
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    monkeypatch.setattr("prefnoise.engine.uris.filesystem_of", lambda uri: (fs, uri.split("://", 1)[1]))
    return root


def test_a_remote_input_is_read_through_a_private_copy(memfs):
    (memfs / "in.jsonl").write_text('{"a": 1}\n')
    with readable_path("mem://in.jsonl") as local:
        assert Path(local).read_text() == '{"a": 1}\n' and Path(local).name == "in.jsonl"
        assert Path(local).parent != memfs
    assert not Path(local).exists()
    with pytest.raises(PrefnoiseError, match=r"^mem://gone.jsonl: not found"), readable_path("mem://gone.jsonl"):
        pass


def _prefnoise_parquet(path: Path, value: int) -> None:
    """A Parquet file as prefnoise writes them: its footer carries prefnoise's provenance key."""
    table = pa.table({"a": [value]}).replace_schema_metadata({b"prefnoise": b"{}"})
    pq.write_table(table, path)


def test_a_remote_output_appears_whole_only_on_success_and_replaces_only_its_own_with_overwrite(memfs):
    with writable_path("mem://out/x.parquet", overwrite=False) as local:
        _prefnoise_parquet(Path(local), 1)
        assert not (memfs / "out" / "x.parquet").exists()  # nothing visible before the block ends
    assert pq.read_table(memfs / "out" / "x.parquet")["a"].to_pylist() == [1]
    with pytest.raises(PrefnoiseError, match=r"^OUT mem://out/x.parquet: exists \(an earlier prefnoise output\); "
                                             r"pass --overwrite to replace it$"):
        with writable_path("mem://out/x.parquet", overwrite=False):
            pass
    with pytest.raises(RuntimeError), writable_path("mem://out/x.parquet", overwrite=True) as local:
        _prefnoise_parquet(Path(local), 2)
        raise RuntimeError("the command failed")
    assert pq.read_table(memfs / "out" / "x.parquet")["a"].to_pylist() == [1]  # a failed run leaves the old one
    assert sorted(p.name for p in (memfs / "out").iterdir()) == ["x.parquet"]  # and no temporary
    with writable_path("mem://out/x.parquet", overwrite=True) as local:
        _prefnoise_parquet(Path(local), 3)
    assert pq.read_table(memfs / "out" / "x.parquet")["a"].to_pylist() == [3]
    with pytest.raises(PrefnoiseError, match="is a directory"), writable_path("mem://out", overwrite=True):
        pass


def test_a_remote_file_prefnoise_cannot_prove_it_wrote_is_never_replaced_even_with_overwrite(memfs):
    pq.write_table(pa.table({"a": [7]}), memfs / "theirs.parquet")  # a Parquet file without prefnoise's key
    (memfs / "theirs.csv").write_text("a\n7\n")
    (memfs / "theirs.jsonl").write_text('{"a": 7}\n')
    before = {p.name: p.read_bytes() for p in memfs.iterdir()}
    refusals = {
        "theirs.parquet": r"^OUT mem://theirs.parquet: exists and was not written by prefnoise, which never replaces "
                          r"such files; give another name$",
        "theirs.csv": r"^OUT mem://theirs.csv: exists; JSON lines and CSV files carry no provenance, .* \(even with "
                      r"--overwrite\); remove it or use another name$",
        "theirs.jsonl": r"^OUT mem://theirs.jsonl: exists; JSON lines and CSV files carry no provenance",
    }
    for name, message in refusals.items():
        with pytest.raises(PrefnoiseError, match=message) as caught:
            with writable_path(f"mem://{name}", overwrite=True) as local:
                Path(local).write_text("replacement")
        assert caught.value.exit_code == 2
    assert {p.name: p.read_bytes() for p in memfs.iterdir()} == before  # untouched, no temporary beside them


def test_a_remote_output_changed_by_another_writer_during_the_run_is_not_replaced(memfs):
    _prefnoise_parquet(memfs / "x.parquet", 1)
    with pytest.raises(PrefnoiseError, match=r"^OUT mem://x.parquet: changed while this run wrote it; nothing was"):
        with writable_path("mem://x.parquet", overwrite=True) as local:
            _prefnoise_parquet(Path(local), 2)
            _prefnoise_parquet(memfs / "x.parquet", 30)  # another run's output lands meanwhile (other size)
    assert pq.read_table(memfs / "x.parquet")["a"].to_pylist() == [30]
    with pytest.raises(PrefnoiseError, match=r"^OUT mem://y.parquet: changed while this run wrote it"):
        with writable_path("mem://y.parquet", overwrite=True) as local:  # absent at the check, present at the end
            _prefnoise_parquet(Path(local), 2)
            _prefnoise_parquet(memfs / "y.parquet", 40)
    assert pq.read_table(memfs / "y.parquet")["a"].to_pylist() == [40]


# --------------------------------------------------------------------------- Ray's own output


def test_rays_own_warnings_are_silenced_unless_ray_output_is_on():
    def warn_as_ray_does() -> None:
        warnings.warn_explicit("a note about Ray's settings", UserWarning, "ray/data/dataset.py", 1,
                               module="ray.data.dataset")
        warnings.warn("`ray_remote_args` is deprecated", DeprecationWarning, stacklevel=1)  # blamed on its caller

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_ray_warnings():
            warn_as_ray_does()
        assert seen == []
        token = RAY_OUTPUT.set(True)
        try:
            with quiet_ray_warnings():
                warn_as_ray_does()
        finally:
            RAY_OUTPUT.reset(token)
    assert [str(w.message) for w in seen] == ["a note about Ray's settings", "`ray_remote_args` is deprecated"]


def test_the_cli_lets_rays_output_through_only_under_debug(monkeypatch):
    from prefnoise.cli.common import prefnoise_warnings_on_stderr  # the CLI's gate for other libraries' output

    monkeypatch.delenv("PREFNOISE_DEBUG", raising=False)
    with prefnoise_warnings_on_stderr():
        assert RAY_OUTPUT.get() is False
    monkeypatch.setenv("PREFNOISE_DEBUG", "1")
    with prefnoise_warnings_on_stderr():
        assert RAY_OUTPUT.get() is True
    assert RAY_OUTPUT.get() is False  # reset when the command ends
