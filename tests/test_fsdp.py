"""FSDP on CPU: `accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml` (2 processes, gloo,
FSDP2) gives align and fit-reward the results of one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors.torch import load_file

from tests.cli_helpers import invoke
from tests.conftest import make_feature_pairs
from tests.tiny_models import pattern_pairs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"


def launch(*args: object, port: int) -> dict:
    """Run ``prefnoise ARGS --json`` on 2 CPU processes under the shipped FSDP config; its summary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--main_process_port", str(port), "-m", "prefnoise", *map(str, args), "--json"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_shipped_config_asks_for_fsdp2_on_two_cpu_processes():
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["use_cpu"] is True
    assert config["num_processes"] == 2 and config["fsdp_config"]["fsdp_version"] == 2


def test_align_under_fsdp_matches_one_process(lm_path, tmp_path):
    data = tmp_path / "pairs.parquet"
    pattern_pairs(64, seed=8).with_columns(flipped=pl.Series([i % 5 == 0 for i in range(64)])).write_parquet(data)
    common = [data, "--model", lm_path, "--max-steps", "3", "--max-length", "32", "--max-prompt-length", "16",
              "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--val-fraction", "0.2"]
    summary = launch("align", *common, "--out", tmp_path / "fsdp", "--batch-size", "4", port=29561)
    assert summary["processes"] == 2 and summary["weights_agree"]
    assert invoke("align", *common, "--out", tmp_path / "one", "--batch-size", "8").exit_code == 0
    sharded = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert max(float((sharded[k] - one[k]).abs().max()) for k in one) < 1e-5
    base = load_file(lm_path / "model.safetensors")
    assert max(float((one[k] - base[k]).abs().max()) for k in one) > 1e-4  # it trained
    val_one = json.loads((tmp_path / "one" / "summary.json").read_text())["val"]
    assert summary["val"]["margin"] == pytest.approx(val_one["margin"], abs=1e-5)


def test_fit_reward_under_fsdp_matches_one_process(tmp_path):
    data = tmp_path / "features.parquet"
    make_feature_pairs(128, dim=8, seed=1).write_parquet(data)
    common = [data, "--epochs", "2", "--hidden", "8", "--device", "cpu", "--precision", "fp32", "--seed", "3",
              "--val-fraction", "0"]
    summary = launch("fit-reward", *common, "--out", tmp_path / "fsdp", "--batch-size", "8", port=29562)
    assert summary["processes"] == 2 and summary["optimizer_steps"] == 16
    assert invoke("fit-reward", *common, "--out", tmp_path / "one", "--batch-size", "16").exit_code == 0
    # margins, not raw weights: the output bias has no gradient (it cancels in r(chosen) − r(rejected)),
    # so Adam turns the processes' float round-off in it into a drift that changes no margin
    margins = {}
    for name in ("fsdp", "one"):
        scored = tmp_path / f"{name}.parquet"
        assert invoke("score", tmp_path / name, data, scored, "--device", "cpu").exit_code == 0
        table = pl.read_parquet(scored)
        margins[name] = (table["chosen_reward"] - table["rejected_reward"]).to_numpy()
    assert np.abs(margins["fsdp"] - margins["one"]).max() < 1e-4
