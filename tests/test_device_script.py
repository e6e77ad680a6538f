"""bench/device.sh --device cpu --tiny: the prepared GPU check's CPU mode writes finite, positive figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from device_check import flop_parameters, peak_tflops, step_flops  # noqa: E402

POSITIVE = ("tokens_per_s", "padded_tokens_per_s", "achieved_tflops", "mfu", "flops", "seconds", "tokens",
            "padded_tokens", "peak_tflops")


def test_step_flops_by_hand():
    # two sequences of 3 and 5 tokens, N = 10, L = 2, d = 4: 6·10·8 + 12·2·4·(9 + 25)
    assert step_flops([3, 5], 10, 2, 4) == 480 + 3264


def test_flop_parameters_of_gpt2_small():
    total, non_embedding, n = flop_parameters(12, 768, 50257)
    assert total == 124_439_808  # GPT-2 small's published count, tied head counted once
    # 12 blocks of 12·768² + 13·768, and the final layer norm
    assert non_embedding == total - 50257 * 768 - 1024 * 768 == 12 * 7_087_872 + 1536 == 85_056_000
    assert n == non_embedding + 50257 * 768


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H200") == (989.4, "table: H200")
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak_tflops("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")
    assert peak_tflops("x86_64")[0] is None


@pytest.mark.slow
def test_device_script_cpu_tiny_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device.sh"), "--device", "cpu", "--tiny",
                           "--peak-tflops", "0.5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device.json").read_text())
    assert result["device"] == "cpu" and result["tiny"] and result["gpu_tests"]["ran"] is False
    for key in POSITIVE:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["tokens"] <= result["padded_tokens"]
    assert result["measured_steps"] == 3 and result["batch_size_pairs"] == 4
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.5)
    assert result["achieved_tflops"] == pytest.approx(result["flops"] / result["seconds"] / 1e12)
    model = result["model"]
    assert model["n_layer"] == 2 and model["flop_parameters"] > model["non_embedding_parameters"] > 0
    assert 0 < result["lengths"]["mean_sequence_tokens"] <= result["lengths"]["max_sequence_tokens"] <= 64
    assert "6*N*T + 12*L*d*T^2" in result["flops_formula"]
