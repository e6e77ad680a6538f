"""Length-aware batching (prefnoise.batching) and its use by align and fit-reward."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from tiny_models import pattern_pairs
from typer.testing import CliRunner

from prefnoise.batching import (
    BatchSchedule,
    budget_batches,
    epoch_batches,
    epoch_permutation,
    exact_batches,
    padded_tokens,
    padding_fraction,
    pair_length,
    split_to_multiple,
)
from prefnoise.cli import app
from prefnoise.errors import PrefnoiseError
from prefnoise.policy import AlignConfig, batch_schedule, step_rows
from tests.option_helpers import option_error

SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu"]


def skewed(n: int = 400, seed: int = 0) -> list[int]:
    """Long-tailed lengths, as real chat data: lognormal, 4..512."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.0, 0.8, n), 4, 512).astype(int).tolist()


def flat(groups) -> list[int]:
    return [j for group in groups for part in group for j in part]


def test_pair_length_and_padded_tokens_by_hand():
    assert pair_length(5, 3, 7) == 12  # prompt + the longer response: both sides share one width
    assert padded_tokens([12, 4, 9]) == 2 * 3 * 12  # chosen and rejected rows of 3 pairs, width 12
    assert padded_tokens([12, 4, 9], rows_per_example=1) == 36
    assert padding_fraction([[0, 1]], [2, 4]) == pytest.approx(0.25)  # 6 useful of 8 padded
    assert padding_fraction([[0], [1]], [2, 4]) == 0.0


def test_exact_mode_is_todays_order():
    """exact == the old align order: the epoch permutation cut into P·B rows, process r taking its slice."""
    n, b, p, seed = 23, 3, 2, 5
    for epoch in range(3):
        order = epoch_permutation(n, seed, epoch)
        old = [[order[k * b * p:][:b * p][r * b:(r + 1) * b] for r in range(p)] for k in range(n // (b * p))]
        assert epoch_batches([1] * n, batch_size=b, mode="exact", seed=seed, epoch=epoch, processes=p) == old
    assert exact_batches(10, 4, 0, 0) == [epoch_permutation(10, 0, 0)[:4], epoch_permutation(10, 0, 0)[4:8]]


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("budget", [None, 600])
def test_group_modes_use_every_example_once_and_are_deterministic(processes, budget):
    lengths = skewed(203)
    kwargs = {"batch_size": 4, "mode": "group", "max_tokens": budget, "seed": 7, "processes": processes}
    for epoch in range(3):
        groups = epoch_batches(lengths, epoch=epoch, **kwargs)
        assert sorted(flat(groups)) == list(range(203))  # every example exactly once
        assert all(len(group) == processes and all(group) for group in groups)  # no process idles
        assert groups == epoch_batches(lengths, epoch=epoch, **kwargs)  # a pure function of (seed, epoch)
    assert epoch_batches(lengths, epoch=0, **kwargs) != epoch_batches(lengths, epoch=1, **kwargs)
    assert epoch_batches(lengths, epoch=0, **kwargs) != epoch_batches(lengths, epoch=0, **{**kwargs, "seed": 8})


def test_fewer_leftover_rows_than_processes_join_another_batch():
    groups = epoch_batches([5] * 9, batch_size=2, mode="group", seed=0, processes=4)  # 8 + 1 left over
    assert sorted(flat(groups)) == list(range(9)) and len(groups) == 1
    assert sorted(len(part) for part in groups[0]) == [2, 2, 2, 3]


def test_budget_batches_respect_the_budget():
    lengths = skewed(500, seed=1)
    lengths[17] = 700  # one pair alone over the budget trains alone
    budget = 1024
    batches = budget_batches(lengths, budget, 200, seed=3, epoch=0)
    assert sorted(j for b in batches for j in b) == list(range(500))
    for batch in batches:
        assert padded_tokens([lengths[j] for j in batch]) <= budget or len(batch) == 1
    assert [17] in batches
    # hand-checked: widths 10, 9, 3, 3, 3 under a budget of 40 padded tokens (2 rows per pair)
    # [10, 9] costs 2·2·10 = 40; a third pair would cost 60; then the three 3s cost 2·3·3 = 18
    first, second = budget_batches([3, 10, 3, 9, 3], 40, 5, seed=0, epoch=0, shuffle=False)
    assert first == [1, 3] and sorted(second) == [0, 2, 4]


def test_group_mode_cuts_padding_on_skewed_lengths():
    lengths = skewed(1000, seed=2)
    exact = [b for g in epoch_batches(lengths, batch_size=8, mode="exact", seed=0) for b in g]
    group = [b for g in epoch_batches(lengths, batch_size=8, mode="group", seed=0) for b in g]
    budget = [b for g in epoch_batches(lengths, batch_size=8, mode="group", max_tokens=4096, seed=0) for b in g]
    exact_pad, group_pad, budget_pad = (padding_fraction(x, lengths) for x in (exact, group, budget))
    # seeded numbers: about half of an exact batch is padding, a few percent of a grouped one
    assert exact_pad == pytest.approx(0.5524, abs=1e-4)
    assert group_pad == pytest.approx(0.0283, abs=1e-4)
    assert budget_pad == pytest.approx(0.0371, abs=1e-4)
    assert group_pad < exact_pad / 10


def test_split_to_multiple_keeps_every_example():
    batches = split_to_multiple([[0, 1, 2, 3], [4], [5, 6]], 2)
    assert batches == [[0, 1], [2, 3], [4], [5, 6]]
    with pytest.raises(ValueError):
        split_to_multiple([[0]], 2)


def test_schedule_locates_micro_batches_over_epochs_of_varying_size():
    lengths = skewed(120, seed=4)
    schedule = BatchSchedule(lengths, batch_size=4, mode="group", max_tokens=1500, seed=1)
    counts = [len(schedule.epoch(e)) for e in range(3)]
    assert schedule.micro_batches(3) == sum(counts)
    k = counts[0] + 2  # third micro-batch of epoch 1
    assert schedule.locate(k) == (1, schedule.epoch(1)[2])
    assert schedule.epoch_of(counts[0]) == 1.0
    assert schedule.epoch_of(counts[0] + counts[1] // 2) == pytest.approx(1 + (counts[1] // 2) / counts[1])


def test_step_divisors_give_the_mean_per_pair_loss_over_the_step():
    """Micro-batches of 3 and 1 pairs, grad_accum 2: divisors T/n = 4/3 and 4, so the two backward
    passes add up to the mean over all 4 pairs (not the mean of the two batch means)."""
    schedule = BatchSchedule([9, 9, 9, 2], batch_size=2, mode="group", max_tokens=54, seed=0)
    assert sorted(len(g[0]) for g in schedule.epoch(0)) == [1, 3]
    cfg = AlignConfig(model="m", out="o", batch_size=2, grad_accum=2, max_tokens_per_batch=54)
    rows, divisors = step_rows(schedule, 0, cfg, [10, 11, 12, 13], rank=0)
    assert sorted(map(len, rows)) == [1, 3] and sorted(sum(rows, [])) == [10, 11, 12, 13]
    losses = {10: 1.0, 11: 2.0, 12: 3.0, 13: 10.0}
    total = sum(float(np.mean([losses[r] for r in batch])) / d for batch, d in zip(rows, divisors, strict=True))
    assert total == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4
    exact = BatchSchedule([9] * 8, batch_size=2, mode="exact", max_tokens=None, seed=0)
    cfg = AlignConfig(model="m", out="o", batch_size=2, grad_accum=2, batching="exact")
    assert step_rows(exact, 0, cfg, list(range(8)), 0)[1] == [2.0, 2.0]  # equal batches: grad_accum, as before


def test_align_options_are_checked():
    AlignConfig(model="m", out="o", max_tokens_per_batch=2048)
    with option_error("^--batching must be one of exact, group", "^batching= must be one of exact, group"):
        AlignConfig(model="m", out="o", batching="sorted")
    with option_error("^--max-tokens-per-batch needs --batching group", "^max_tokens_per_batch= needs batching="):
        AlignConfig(model="m", out="o", batching="exact", max_tokens_per_batch=2048)
    with option_error("^--max-tokens-per-batch must be >= 1", "^max_tokens_per_batch= must be >= 1"):
        AlignConfig(model="m", out="o", max_tokens_per_batch=0)


def test_align_schedule_uses_pair_widths():
    from prefnoise.policy.logprobs import TokenizedPairs, TokenizeSettings

    pairs = TokenizedPairs(["a", "b"], [[1, 2], [1]], [[3], [4, 5, 6]], [[7, 8, 9], [0]], 0,
                           TokenizeSettings(32, 16, False))
    schedule = batch_schedule(AlignConfig(model="m", out="o", batch_size=1), pairs, [1, 0], 1)
    assert schedule.lengths == [4, 5]  # row 1: 1 + max(3, 1); row 0: 2 + max(1, 3)


@pytest.fixture(scope="module")
def skewed_data(tmp_path_factory):
    """Pattern pairs whose responses vary in length from 1 to 12 words."""
    frame = pattern_pairs(48, seed=2)
    words = [1 + (i * 7) % 12 for i in range(48)]
    frame = frame.with_columns(
        chosen=pl.Series([c + " yes" * w for c, w in zip(frame["chosen"], words, strict=True)]),
        rejected=pl.Series([r + " no" * (12 - w) for r, w in zip(frame["rejected"], words, strict=True)]),
    )
    path = tmp_path_factory.mktemp("skewed") / "pairs.parquet"
    frame.write_parquet(path)
    return path


def test_align_group_and_token_budget_run_and_report_padding(lm_path, skewed_data, tmp_path):
    def align(*extra):
        result = CliRunner().invoke(app, ["align", str(skewed_data), "--model", str(lm_path), "--batch-size", "8",
                                          "--json", *SMALL, *map(str, extra)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    exact = align("--dry-run", "--batching", "exact")
    group = align("--dry-run")  # group is the default
    assert exact["batching"] == "exact" and group["batching"] == "group"
    assert group["padding_fraction"] < exact["padding_fraction"]
    assert exact["micro_batches_per_epoch"] == group["micro_batches_per_epoch"] == 6
    done = align("--out", tmp_path / "run", "--max-tokens-per-batch", "256", "--epochs", "1", "--log-every", "1")
    assert done["micro_batches_per_epoch"] > 6  # ≤ 256 padded tokens: fewer than 8 pairs of ~30 tokens
    assert done["steps"] == done["micro_batches_per_epoch"] and np.isfinite(done["train"]["loss"])
    assert done["train"]["epoch"] == 1.0 and done["batching"] == "group"


def test_logits_only_at_scored_positions_equal_the_full_head(lm_path, monkeypatch):
    """sequence_logps asks the model for logits at the scored positions only (boolean logits_to_keep);
    the sums equal those of the full-width head, right or left padded, and gradients flow."""
    from transformers import AutoModelForCausalLM

    from prefnoise.policy import logprobs

    model = AutoModelForCausalLM.from_pretrained(lm_path)
    assert logprobs._keeps_logits_by_mask(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding
    attention[3, :4] = 0  # left padding
    labels = torch.zeros_like(ids)
    labels[:, 6:] = 1
    labels *= attention
    fast = logprobs.sequence_logps(model, ids, attention, labels)
    fast.sum().backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) > 0
    monkeypatch.setattr(logprobs, "_keeps_logits_by_mask", lambda m: False)
    full = logprobs.sequence_logps(model, ids, attention, labels)
    assert torch.allclose(fast, full, rtol=1e-6, atol=1e-4), (fast, full)


def test_reward_scoring_in_length_order_gives_the_same_rewards(lm_path):
    from prefnoise.reward.scoring import pair_rewards as _pair_rewards
    from prefnoise.reward.scoring import prepare_sides as _prepare_sides
    from prefnoise.reward.scoring import scoring_runtime as _runtime
    from prefnoise.reward.transformer import new_transformer

    frame = pattern_pairs(12, seed=1)
    frame = frame.with_columns(chosen=pl.Series([c + " yes" * (i % 5) for i, c in enumerate(frame["chosen"])]))
    torch.manual_seed(0)
    model = new_transformer(lm_path, max_length=64, output_clip=None)
    runtime = _runtime("cpu")
    sides = _prepare_sides(model, frame, runtime.device, None)
    index = np.arange(12)[::-1].copy()
    chosen, rejected = _pair_rewards(model, sides, index, runtime, batch_size=4)
    for k, row in enumerate(index):  # each row alone: no padding at all
        one_c, one_r = _pair_rewards(model, sides, np.array([row]), runtime, batch_size=1)
        assert chosen[k] == pytest.approx(float(one_c[0]), abs=1e-5)
        assert rejected[k] == pytest.approx(float(one_r[0]), abs=1e-5)


def test_a_checkpoint_from_before_batching_options_resumes_only_in_exact_mode(tmp_path):
    """Checkpoints written before --batching existed ran the exact order: they resume with exact."""
    from dataclasses import asdict

    from prefnoise.policy import check_resumable

    old = {k: v for k, v in asdict(AlignConfig(model="m", out="o")).items()
           if k not in ("batching", "max_tokens_per_batch")}
    check_resumable(AlignConfig(model="m", out="o", batching="exact"), old, tmp_path)
    with pytest.raises(PrefnoiseError, match="different --batching"):
        check_resumable(AlignConfig(model="m", out="o"), old, tmp_path)
