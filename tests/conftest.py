"""Shared fixtures: small canonical tables and paths to the bundled and real data."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenMP/MKL thread in every process the tests start (prefnoise commands, accelerate launches, the docs
# examples), as the in-process tests use (_one_torch_thread): the two xdist workers already fill both cores of
# a 2-core machine, and each child's second torch thread only contended with the other worker (the suite used
# ~10% less CPU with it). setdefault: a run that sets it keeps its own value.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import polars as pl
import pytest

from tests.ray_helpers import mem_bucket, ray_cluster  # noqa: F401  (the session's one local Ray; mem://)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pairs.parquet"
REAL_HH = ROOT.parent / "shared" / "data" / "real" / "hh-rlhf-harmless-base-test.jsonl.gz"


def make_pairs(n: int, seed: int = 0, *, scores: bool = True) -> pl.DataFrame:
    """n distinct synthetic pairs; chosen has the higher true score when ``scores``."""
    rng = np.random.default_rng(seed)
    sc = rng.normal(size=n)
    sr = sc - np.abs(rng.normal(size=n)) - 1e-3
    data = {
        "prompt": [f"question {i}" for i in range(n)],
        "chosen": [f"good answer {i} " + "x" * int(rng.integers(0, 20)) for i in range(n)],
        "rejected": [f"bad answer {i} " + "y" * int(rng.integers(0, 20)) for i in range(n)],
    }
    if scores:
        data["chosen_score"] = sc
        data["rejected_score"] = sr
    return pl.DataFrame(data)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (and a shared, loaded machine does not stall them)."""
    from tests.tiny_models import single_torch_thread

    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def lm_path(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a BPE tokenizer trained on the pattern task's text, saved once per session."""
    from tests.tiny_models import make_tiny_causal_lm, pattern_texts

    return make_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "gpt2", pattern_texts())


@pytest.fixture
def pairs() -> pl.DataFrame:
    """Twenty clean synthetic pairs with true scores."""
    return make_pairs(20)


@pytest.fixture
def sample_path() -> Path:
    """The bundled sample dataset."""
    return SAMPLE


@pytest.fixture
def real_hh_path() -> Path:
    """The real Anthropic HH slice in ../shared (skips when the checkout has no shared/)."""
    if not REAL_HH.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    return REAL_HH



def make_feature_pairs(n: int, dim: int = 8, seed: int = 0) -> pl.DataFrame:
    """n pairs of random feature vectors with a linear true reward (the package's generator)."""
    from prefnoise.experiments.features import linear_feature_pairs

    return linear_feature_pairs(n, dim, seed=seed)


# The longest tests go to the front of the queue: xdist hands tests out in collection order, and a
# 60-second test collected last would leave one worker idle for its whole run at the end of the suite.
# (Seconds on 2 cores, `pytest --durations=45`, 2026-12-07: 59, 26 and 19 with their module's set-up, 16, 15, 12.)
FIRST = (
    "tests/test_readme_examples.py::test_readme_examples_match_a_fresh_run",
    "tests/test_reproduce_alignment.py::test_quick_alignment_",
    "tests/test_reproduce.py::test_quick_synthetic_",
    "tests/test_fsdp.py::test_align_under_fsdp_matches_one_process",
    "tests/test_cli_align.py::test_two_processes_agree_and_match_one_process_with_the_global_batch",
    "tests/test_fsdp.py::test_fit_reward_under_fsdp_matches_one_process",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest tests first (the Ray group next: one worker runs all of it), the rest in file order."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        for place, prefix in enumerate(FIRST):
            if item.nodeid.startswith(prefix):
                return 0, place  # in FIRST's order: longest first
        return (1 if item.get_closest_marker("ray") is not None else 2), 0

    items.sort(key=rank)  # stable: file order within each rank
