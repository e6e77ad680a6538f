"""`prefnoise align` through CliRunner, and data-parallel through torch.distributed (2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_encoder, pattern_pairs, pattern_texts
from typer.testing import CliRunner

from prefnoise.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pattern_pairs(64, seed=8).with_columns(
        flipped=pl.Series([i % 5 == 0 for i in range(64)])).write_parquet(path)
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["align", *map(str, args)])


def test_align_json_summary_and_output_files(lm_path, data_path, tmp_path):
    out = tmp_path / "run"
    result = run(data_path, "--model", lm_path, "--out", out, "--loss", "dpo", "--batch-size", "8",
                 "--max-steps", "4", "--val-fraction", "0.25", "--log-every", "2", "--json", *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["loss"] == "dpo" and summary["steps"] == 4 and summary["rows"] == 64
    assert summary["train_rows"] + summary["val_rows"] == 64 and summary["val_rows"] > 0
    assert "clean_reward_accuracy" in summary["val"]  # the data has a `flipped` column
    assert {p.name for p in out.iterdir()} == {
        "metrics.jsonl", "ref_logps.parquet", "model", "summary.json", ".prefnoise-output.json"
    }
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 4]  # val@0, train@2, train@4, val@4
    assert json.loads((out / "summary.json").read_text())["train"] == summary["train"]


def test_human_summary_names_cache_reuse_on_second_run(lm_path, data_path, tmp_path):
    out = tmp_path / "run"
    assert run(data_path, "--model", lm_path, "--out", out, "--max-steps", "1", *SMALL).exit_code == 0
    result = run(data_path, "--model", lm_path, "--out", out, "--max-steps", "1", "--loss", "ipo", *SMALL,
                 "--overwrite")
    assert result.exit_code == 0, result.output
    assert "reference log-probs reused" in result.output and "align: ipo" in result.output


def test_dry_run_prints_plan_and_writes_nothing(lm_path, data_path, tmp_path):
    out = tmp_path / "never"
    result = run(data_path, "--model", lm_path, "--out", out, "--batch-size", "4", "--grad-accum", "2",
                 "--epochs", "3", "--dry-run", "--json", *SMALL)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    # 64 rows, micro-batch 4 → 16 per epoch, 2 per step → 8 steps per epoch, 3 epochs
    assert plan["dry_run"] and plan["rows"] == 64 and plan["steps"] == 24 and plan["micro_batches_per_epoch"] == 16
    assert plan["tokens"] > 64 * 2 * 4 and plan["memory_estimate_bytes"] > 16 * plan["parameters"]
    assert not out.exists()


def test_bad_inputs_exit_2_with_one_line_and_nothing_written(lm_path, data_path, tmp_path):
    encoder = make_tiny_encoder(tmp_path / "bert", pattern_texts())
    empty = tmp_path / "empty.parquet"
    pl.DataFrame(schema={"prompt": pl.String, "chosen": pl.String, "rejected": pl.String}).write_parquet(empty)
    blank = tmp_path / "blank.parquet"
    pattern_pairs(4).with_columns(chosen=pl.Series(["", " yes a", " yes b", " yes c"])).write_parquet(blank)
    cases = {
        "does not exist": (data_path, "--model", tmp_path / "nope"),
        "not a causal language model (BertModel)": (data_path, "--model", encoder),
        "no rows": (empty, "--model", lm_path),
        "empty": (blank, "--model", lm_path),
        "--beta must be > 0": (data_path, "--model", lm_path, "--beta", "0"),
        "--noise-rate must be in [0, 0.5)": (data_path, "--model", lm_path, "--loss", "rdpo", "--noise-rate", "0.5"),
        "--label-smoothing must be in [0, 0.5)": (data_path, "--model", lm_path, "--label-smoothing", "-0.1"),
        "--loss must be one of": (data_path, "--model", lm_path, "--loss", "kto"),
    }
    for i, (message, args) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        result = run(*args, "--out", out, *SMALL)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not out.exists(), message


def test_two_processes_agree_and_match_one_process_with_the_global_batch(lm_path, data_path, tmp_path):
    """torch.distributed (gloo) with 2 CPU processes × batch 4 == 1 process × batch 8."""
    common = [str(data_path), "--model", str(lm_path), "--max-steps", "3", "--json", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
              "-m", "prefnoise", "align", *common, "--out", str(tmp_path / "ddp"), "--batch-size", "4"]
    done = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["weights_agree"]
    assert run(*common, "--out", tmp_path / "one", "--batch-size", "8").exit_code == 0
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert max(float((ddp[k] - one[k]).abs().max()) for k in one) < 1e-5
    base = load_file(lm_path / "model.safetensors")
    assert not torch.allclose(one["transformer.h.1.mlp.c_proj.weight"], base["transformer.h.1.mlp.c_proj.weight"])


def test_cli_module_imports_no_torch_and_mirrors_the_library_choices():
    # `prefnoise --help` must not pay for torch: the align command imports it inside the function.
    import ast
    import inspect

    import prefnoise.cli.align as command
    import prefnoise.options.align as library
    import prefnoise.options.training as training_options
    from prefnoise.losses import POLICY_LOSSES

    top_level = set()
    for node in ast.parse(inspect.getsource(command)).body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module or "")
    heavy = {"torch", "transformers", "accelerate", "peft", "prefnoise.policy", "prefnoise.losses",
             "prefnoise.policy.logprobs", "prefnoise.training"}
    assert not top_level & heavy, top_level & heavy
    # the option lists spelled out in the CLI (to stay import-light) are the library's
    assert command.POLICY_LOSSES == POLICY_LOSSES
    assert command.SCHEDULES == training_options.SCHEDULES and command.DEVICES == library.DEVICES
