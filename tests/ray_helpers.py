"""One local Ray (2 CPUs) for every Ray test of a session, and the marks a Ray test carries.

Decorate a test with ``@ray_test`` and take the ``ray_cluster`` fixture: ``pytest.mark.ray`` plus
``xdist_group("ray")``, so one xdist worker (``--dist loadgroup``) runs them all against one cluster,
started once. Without ray[data] installed the fixture skips the test.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

from prefnoise.errors import PrefnoiseError

RAY_CPUS = 2
IDLE_WORKER_KEPT_MS = 3_600_000  # the test cluster's idle workers live an hour (Ray's default: a second)


def ray_test(function):
    """Mark a Ray test: ``ray`` and ``xdist_group("ray")`` (one xdist worker runs every Ray test)."""
    return pytest.mark.ray(pytest.mark.xdist_group("ray")(function))


def ray_installed() -> bool:
    """Whether ray[data] can be imported here."""
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray with 2 CPUs (a RaySession); ``--engine ray`` calls in the tests join it."""
    if not ray_installed():
        pytest.skip("ray[data] is not installed (pip install 'prefnoise[ray]')")
    from prefnoise.engine import ray_session  # ray: loaded only when a Ray test runs
    from prefnoise.options import EngineOptions  # beside the session it configures

    # Ray kills an idle worker after a second once it holds more processes than CPUs: while a test's actors
    # (a model each) are alive, so every test after one would boot new task workers (seconds each on 2
    # cores); the test cluster keeps them (the raylet reads RAY_* settings from its environment at start)
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as env:  # only while the cluster starts: later subprocesses lack it
            env.setenv("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_KEPT_MS))
            session = stack.enter_context(ray_session(EngineOptions(engine="ray", workers=RAY_CPUS)))
        yield session


@pytest.fixture
def mem_bucket(tmp_path, monkeypatch) -> Path:
    """A directory standing for a remote bucket: ``mem://NAME`` URIs open ``NAME`` in it through pyarrow (a
    remote filesystem to prefnoise: inputs are copied in, outputs uploaded and moved, as for s3://)."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    fs = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    monkeypatch.setattr("prefnoise.engine.uris.filesystem_of", lambda uri: (fs, uri.split("://", 1)[1]))
    return bucket


# Work for test blocks: defined here, in a module the Ray workers import (tests.* is on their path), since a
# function of a test module pickles by a module name that only pytest knows.

def tag_block(frame: pl.DataFrame, info) -> tuple[list[int], int, int]:
    """(values of column a, block index, row offset); a PrefnoiseError for an empty block."""
    if frame.height == 0:
        raise PrefnoiseError(f"block {info.index} is empty", exit_code=2)
    if frame["a"].min() < 0:
        return 1 // 0  # a bug in the work, not the user's input
    return frame["a"].to_list(), info.index, info.row_offset


class Scaler:
    """A stateful worker: built once per actor (as a model would be loaded), then called per block."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, frame: pl.DataFrame, info) -> list[int]:
        return (frame["a"] * self.factor).to_list()
