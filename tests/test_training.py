"""The one training loop (prefnoise.training) under fit-reward and align: the schedule formula, the same
numbers as a plain PyTorch loop, accumulation, exact --resume, LoRA, and --report-to tensorboard."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.data import canonicalize
from prefnoise.errors import PrefnoiseError
from prefnoise.losses import get_margin_loss
from prefnoise.reward import fit_reward_model, load_reward_model, save_reward_model, score_table
from prefnoise.training import changed_options, learning_rate, split_by_pair_id
from tests.cli_helpers import invoke
from tests.conftest import make_feature_pairs
from tests.option_helpers import option_error
from tests.tiny_models import pattern_pairs

N = 96


def feature_table(n: int = N, seed: int = 1) -> pl.DataFrame:
    return canonicalize(make_feature_pairs(n, dim=8, seed=seed))[0]


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def test_learning_rate_by_hand():
    # warmup 2 of 10 steps: lr/3, 2lr/3, then from lr down; linear reaches lr·(1 − 7/8) at step 9
    assert [learning_rate(s, 10, 0.3, "linear", 2) for s in (0, 1, 2, 6, 9)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.3 * (1 - 4 / 8), 0.3 * (1 - 7 / 8)])
    assert [learning_rate(s, 10, 1.0, "constant", 2) for s in (0, 2, 9)] == pytest.approx([1 / 3, 1.0, 1.0])
    # cosine: half-way through the decay the rate is lr/2
    assert learning_rate(6, 10, 1.0, "cosine", 2) == pytest.approx(0.5)
    assert learning_rate(0, 10, 1.0, "cosine", 0) == pytest.approx(1.0)


def test_changed_options_names_flags_and_skips_free_ones():
    saved = {"lr": 1e-3, "epochs": 2, "device": "cpu"}
    now = {"lr": 1e-3, "epochs": 3, "device": "cuda", "grad_accum": 1}
    assert changed_options(saved, now, free=("device",), legacy={"grad_accum": 1}) == ["--epochs"]


def test_fit_reward_equals_a_plain_pytorch_loop():
    """The shared trainer changes no number: the mlp backend's weights after 2 epochs are those of a
    hand-written AdamW loop over the same shuffled batches."""
    frame = feature_table()
    result = fit_reward_model(frame, loss="sigmoid", epochs=2, batch_size=16, lr=1e-2, val_fraction=0.25,
                              hidden=8, layers=1, seed=5, device="cpu")

    torch.manual_seed(5)
    from prefnoise.reward.models import new_mlp

    net = new_mlp(8, hidden=8, layers=1, dropout=0.0, output_clip=20.0).module
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    train_index = np.flatnonzero(~split_by_pair_id(frame[C.PAIR_ID], 0.25, 5))
    chosen = torch.tensor(np.stack(frame[C.chosen(C.FEATURES)].to_list()), dtype=torch.float32)
    rejected = torch.tensor(np.stack(frame[C.rejected(C.FEATURES)].to_list()), dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    sigmoid = get_margin_loss("sigmoid").fn
    for _ in range(2):
        order = train_index[torch.randperm(len(train_index), generator=generator).numpy()]
        for start in range(0, len(order), 16):
            rows = torch.as_tensor(order[start:start + 16])
            rewards = net(torch.cat([chosen[rows], rejected[rows]]))
            loss = sigmoid(rewards[: len(rows)] - rewards[len(rows):]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert_same_weights(weights(result), net.state_dict(), atol=1e-6)
    assert result.metrics["optimizer_steps"] == 2 * math.ceil(len(train_index) / 16)


def test_gradient_accumulation_equals_the_larger_batch():
    frame = feature_table()
    options = dict(loss="logistic", epochs=2, lr=1e-2, val_fraction=0.0, hidden=8, layers=1, seed=2, device="cpu")
    big = fit_reward_model(frame, batch_size=32, **options)
    accumulated = fit_reward_model(frame, batch_size=8, grad_accum=4, **options)
    assert_same_weights(weights(big), weights(accumulated), atol=1e-5)
    assert big.metrics["optimizer_steps"] == accumulated.metrics["optimizer_steps"] == 6
    # the jsonl records: a train record per log step and epoch end, with lr and loss
    train = [r for r in accumulated.records if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6] and all(math.isfinite(r["loss"]) for r in train)


def test_clipping_bounds_the_update():
    frame = feature_table()
    options = dict(loss="logistic", epochs=1, batch_size=N, lr=1.0, val_fraction=0.0, hidden=8, layers=1,
                   seed=3, device="cpu", log_every=1)
    clipped = fit_reward_model(frame, max_grad_norm=1e-3, **options)
    free = fit_reward_model(frame, max_grad_norm=0.0, **options)
    assert clipped.records[0]["grad_norm"] > 1e-3  # the norm before clipping is reported
    assert "grad_norm" not in free.records[0]
    assert clipped.metrics["settings"]["max_grad_norm"] == 1e-3


class Interrupt(Exception):
    pass


def test_fit_reward_resume_is_exact(tmp_path):
    """Interrupted after 7 optimizer steps (a checkpoint every 3), resumed: the same weights, history
    and early-stopping choice as one uninterrupted run; dropout makes the restored RNG matter."""
    frame = feature_table(160)
    options = dict(loss="sigmoid", epochs=4, batch_size=24, lr=5e-3, val_fraction=0.2, hidden=16, layers=2,
                   dropout=0.2, seed=4, device="cpu", early_stopping=3, save_every=3)
    whole = fit_reward_model(frame, run_dir=tmp_path / "whole", **options)

    seen = {"pairs": 0}

    def stop_after_seven_steps(n: int) -> None:
        seen["pairs"] += n
        if seen["pairs"] >= 7 * 24:
            raise Interrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        fit_reward_model(frame, run_dir=run, on_progress=stop_after_seven_steps, **options)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000006"]
    resumed = fit_reward_model(frame, run_dir=run, resume=True, **options)
    assert resumed.metrics["resumed_from_step"] == 6
    assert_same_weights(weights(whole), weights(resumed))
    assert resumed.metrics["epochs"] == whole.metrics["epochs"]
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == whole.records  # records after the checkpoint were dropped and logged again, once

    with pytest.raises(PrefnoiseError, match="--resume: .* different --lr"):
        fit_reward_model(frame, run_dir=run, resume=True, **{**options, "lr": 1e-3})
    with pytest.raises(PrefnoiseError, match="the data differs"):
        fit_reward_model(feature_table(160, seed=9), run_dir=run, resume=True, **options)


def test_lora_reward_model_trains_adapters_and_saves_merged_weights(lm_path, tmp_path):
    texts = canonicalize(pattern_pairs(24, seed=3))[0]
    fit = fit_reward_model(texts, backend="transformer", model_path=lm_path, epochs=1, batch_size=8, lr=1e-2,
                           max_length=32, val_fraction=0.0, device="cpu", lora_r=4, lora_alpha=8)
    assert fit.model.config["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "merged": True}
    assert not hasattr(fit.model.module.model, "peft_config")  # merged: a plain transformers model
    out = save_reward_model(fit, tmp_path / "rm", history=[])
    before = score_table(fit.model, texts, device="cpu")
    after = score_table(load_reward_model(out), texts, device="cpu")
    assert np.allclose(before[C.chosen(C.REWARD)].to_numpy(), after[C.chosen(C.REWARD)].to_numpy(), atol=1e-5)
    # the base weights moved only through the adapters: rank-4 changes of each adapted matrix
    from safetensors.torch import load_file

    base = load_file(lm_path / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    name = next(k for k in base if k.endswith("mlp.c_fc.weight"))
    delta = tuned[name] - base[name]
    assert 0 < torch.linalg.matrix_rank(delta).item() <= 4


def test_lora_needs_a_transformer():
    with option_error("^--lora-r applies to a transformer --model only", "^lora_r= applies to a transformer model="):
        fit_reward_model(feature_table(), epochs=1, lora_r=4, device="cpu")


def test_report_to_tensorboard_through_the_cli(tmp_path):
    pytest.importorskip("tensorboard")
    data = tmp_path / "pairs.parquet"
    feature_table(64).write_parquet(data)
    out = tmp_path / "rm"
    result = invoke("fit-reward", data, "--out", out, "--epochs", "2", "--batch-size", "16", "--hidden", "8",
                    "--device", "cpu", "--report-to", "tensorboard", "--log-every", "1", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/loss", "val/loss", "val/reward_accuracy"} <= set(accumulator.Tags()["scalars"])
    steps = json.loads((out / "metrics.json").read_text())["optimizer_steps"]
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, steps + 1))  # --log-every 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records].count("val") == 2

    missing = invoke("fit-reward", data, "--out", tmp_path / "rm2", "--report-to", "mlflow", "--device", "cpu")
    assert missing.exit_code == 2 and "--report-to must be one of" in missing.stderr


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_a_tracker_without_its_package_fails_in_one_line(tracker, tmp_path):
    import importlib.util

    from prefnoise.training import check_report_to

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(PrefnoiseError, match=f"--report-to {tracker} needs the {tracker} package: pip install"):
        check_report_to(tracker, tmp_path)
    with pytest.raises(PrefnoiseError, match="needs an output directory"):
        check_report_to("tensorboard", None)
