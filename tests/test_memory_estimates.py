"""Memory estimated before allocating (issue 22): align's plan and a transformer's weights are checked
against what this process may allocate, and refused in one line with the estimate."""

from __future__ import annotations

import pytest
from tiny_models import pattern_pairs

from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke

SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pattern_pairs(32, seed=8).write_parquet(path)
    return path


def test_align_on_cpu_refuses_a_run_its_memory_estimate_says_cannot_fit(lm_path, data_path, tmp_path, monkeypatch):
    # 1 MB: the tiny model's weights (235 KB) load, its training plan (about 2.3 MB) does not
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1_000_000)
    out = tmp_path / "run"
    done = invoke("align", data_path, "--model", lm_path, "--out", out, "--max-steps", "1", *SMALL)
    line = assert_one_line_error(done, "needs about", "of memory to train, and 1.0 MB is available",
                                 "lower --batch-size or --max-length")
    assert "parameters" in line
    assert_nothing_written(out)


def test_a_transformer_whose_weights_cannot_fit_is_refused_before_loading(lm_path, data_path, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1000)  # 1 KB left
    out = tmp_path / "rm"
    done = invoke("fit-reward", data_path, "--model", lm_path, "--out", out, "--epochs", "1", "--max-length", "32")
    line = assert_one_line_error(done, "parameters in float32) needs about", "of memory to load, and 1.0 KB is "
                                 "available", "use a smaller model")
    assert str(lm_path) in line
    assert_nothing_written(out)
