"""Issue "Real text, faithfully" — losses and their parameters: TRL's per-token IPO, Dr. DPO, required ε."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.data import write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.losses import drdpo_loss, margin_loss, policy_objective, preference_loss
from prefnoise.noise import NoiseSpec, corrupt_frame
from prefnoise.policy import AlignConfig, response_tokens
from prefnoise.policy.logprobs import TokenizedPairs, TokenizeSettings, collate_pairs
from prefnoise.reward.synthetic import feature_pairs
from tests.option_helpers import option_error
from tests.tiny_models import pattern_pairs

runner = CliRunner()
SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu"]


# --- IPO: TRL's per-token averaged log-ratios -----------------------------------------------------

def trl_ipo_loss(per_token_logps, ref_chosen, ref_rejected, batch, beta):
    """TRL's own DPOTrainer._compute_loss with loss_type="ipo", on given per-token policy log-probs."""
    from trl import DPOTrainer

    width = per_token_logps.shape[1]
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros_like(per_token_logps),
                              mean_logits=torch.zeros_like(per_token_logps),
                              is_top1=torch.zeros(per_token_logps.shape, dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["ipo"], loss_weights=[1.0],
        beta=beta, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["labels_mask"], "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    assert width == batch["input_ids"].shape[1] - 1
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


def test_ipo_matches_trl_dpo_trainer_loss_on_the_same_logps():
    pytest.importorskip("trl")
    # Three pairs with different prompt and response lengths (right padding, as collate_pairs does).
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    chosen = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29]]
    rejected = [[30, 31], [32, 33, 34, 35, 36, 37], [38]]
    pairs = TokenizedPairs(["a", "b", "c"], prompts, chosen, rejected, 0, TokenizeSettings())
    batch = collate_pairs(pairs, range(3), pad_id=0)
    generator = torch.Generator().manual_seed(0)
    scored = batch["labels_mask"][:, 1:].double()  # token t is scored from position t-1
    per_token = -torch.rand(scored.shape, generator=generator, dtype=torch.float64) * 3 * scored
    summed = per_token.sum(1)
    policy_c, policy_r = summed[:3], summed[3:]
    ref_c = torch.tensor([-7.5, -2.0, -4.25], dtype=torch.float64)
    ref_r = torch.tensor([-3.0, -9.5, -0.5], dtype=torch.float64)
    tokens = response_tokens(batch)
    assert tokens[0].tolist() == [5, 2, 3] and tokens[1].tolist() == [2, 6, 1]
    for beta, tau in ((0.1, None), (0.5, None), (0.3, 0.3)):
        ours, _, _ = preference_loss("ipo", policy_c, policy_r, ref_c, ref_r, beta=beta, tau=tau,
                                     chosen_tokens=tokens[0], rejected_tokens=tokens[1])
        theirs = trl_ipo_loss(per_token, ref_c, ref_r, batch, beta)
        assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)
    # By hand for the first pair at β = 0.1: h = (sum_c + 7.5)/5 − (sum_r + 3)/2, ℓ = (h − 5)².
    h = (float(policy_c[0]) + 7.5) / 5 - (float(policy_r[0]) + 3.0) / 2
    ours, _, _ = preference_loss("ipo", policy_c, policy_r, ref_c, ref_r, beta=0.1,
                                 chosen_tokens=tokens[0], rejected_tokens=tokens[1])
    assert float(ours[0]) == pytest.approx((h - 5.0) ** 2, rel=1e-12)


def test_ipo_without_token_counts_is_an_error_not_a_summed_fallback():
    logps = [torch.tensor([-1.0])] * 4
    with pytest.raises(PrefnoiseError, match="token counts"):
        preference_loss("ipo", *logps)


# --- Dr. DPO ----------------------------------------------------------------------------------

def test_drdpo_hand_value_and_limits():
    rows = torch.tensor([math.log(2.0), math.log(4.0)], dtype=torch.float64)
    # β′ = 1: −log((1/2 + 1/4)/2) = log(8/3)
    assert float(drdpo_loss(rows, 1.0)) == pytest.approx(math.log(8 / 3), rel=1e-12)
    # β′ = 0.5: −0.5·log((1/4 + 1/16)/2) = 0.5·log(32/5)
    assert float(drdpo_loss(rows, 0.5)) == pytest.approx(0.5 * math.log(32 / 5), rel=1e-12)
    assert float(drdpo_loss(rows, 1e6)) == pytest.approx(float(rows.mean()), rel=1e-5)  # → mean (DPO)
    assert float(drdpo_loss(rows, 1e-3)) == pytest.approx(math.log(2.0), abs=1e-2)  # → min
    with pytest.raises(PrefnoiseError, match="beta_prime"):
        drdpo_loss(rows, 0.0)


def test_drdpo_policy_rows_are_dpo_and_objective_is_batch_level():
    logps = [torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.5]),
             torch.tensor([-1.5, -1.5])]
    rows, _, _ = preference_loss("drdpo", *logps, beta=1.0)
    expected_rows = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]  # z = +1, −1
    assert rows.tolist() == pytest.approx(expected_rows, rel=1e-6)
    mean_exp = (math.exp(-expected_rows[0] / 2) + math.exp(-expected_rows[1] / 2)) / 2
    assert float(policy_objective("drdpo", rows, beta_prime=2.0)) == pytest.approx(-2 * math.log(mean_exp), rel=1e-6)
    assert float(policy_objective("dpo", rows)) == pytest.approx(sum(expected_rows) / 2, rel=1e-6)


# --- cDPO / rDPO: ε is required ---------------------------------------------------------------

def test_library_cdpo_rdpo_need_a_rate():
    z = torch.tensor([0.5])
    with pytest.raises(PrefnoiseError, match="--eps"):
        margin_loss("rdpo", z)
    logps = [torch.tensor([-1.0])] * 4
    with pytest.raises(PrefnoiseError, match="label_smoothing"):
        preference_loss("cdpo", *logps)
    with pytest.raises(PrefnoiseError, match="noise_rate"):
        preference_loss("rdpo", *logps)
    with option_error("^--loss rdpo needs --noise-rate", "^loss='rdpo' needs noise_rate="):
        AlignConfig(model="m", out="o", loss="rdpo")
    AlignConfig(model="m", out="o", loss="rdpo", noise_rate=0.0)  # an explicit 0 is fine


@pytest.mark.parametrize(("loss", "flag"), [("cdpo", "--label-smoothing"), ("rdpo", "--noise-rate")])
def test_align_cli_without_rate_exits_2_naming_the_option(tmp_path, loss, flag):
    result = runner.invoke(app, ["align", str(tmp_path / "pairs.parquet"), "--model", str(tmp_path / "lm"),
                                 "--out", str(tmp_path / "out"), "--loss", loss])
    assert result.exit_code == 2, result.output
    assert flag in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loss", ["cdpo", "rdpo"])
def test_fit_reward_cli_without_eps_exits_2_naming_the_option(tmp_path, loss):
    result = runner.invoke(app, ["fit-reward", str(tmp_path / "pairs.parquet"), "--loss", loss,
                                 "--out", str(tmp_path / "rm")])
    assert result.exit_code == 2, result.output
    assert "--eps" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "rm").exists()


def test_align_cli_beta_prime_is_range_checked(tmp_path):
    result = runner.invoke(app, ["align", str(tmp_path / "p.parquet"), "--model", str(tmp_path / "lm"),
                                 "--out", str(tmp_path / "out"), "--loss", "drdpo", "--beta-prime", "0"])
    assert result.exit_code == 2 and "--beta-prime must be > 0" in result.output


# --- ε in summaries and metrics ---------------------------------------------------------------

@pytest.fixture(scope="module")
def align_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pattern_pairs(16, seed=8).with_columns(flipped=pl.Series([i % 5 == 0 for i in range(16)])).write_parquet(path)
    return path


def test_align_reports_eps_in_summaries_and_metrics(lm_path, align_data, tmp_path):
    out = tmp_path / "run"
    common = [str(align_data), "--model", str(lm_path), "--batch-size", "8", "--max-steps", "1", *SMALL]
    result = runner.invoke(app, ["align", *common, "--out", str(out), "--loss", "rdpo", "--noise-rate", "0.2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["eps"] == 0.2 and summary["loss_params"]["eps"] == 0.2 and summary["loss_level"] == "row"
    assert summary["train"]["eps"] == 0.2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["eps"] == 0.2 for r in records)
    assert json.loads((out / "summary.json").read_text())["eps"] == 0.2
    human = runner.invoke(app, ["align", *common, "--out", str(tmp_path / "c"), "--loss", "cdpo",
                                "--label-smoothing", "0.15"])
    assert human.exit_code == 0, human.output
    assert "align: cdpo" in human.output and "ε = 0.15" in human.output


def test_align_drdpo_records_say_the_loss_is_batch_level(lm_path, align_data, tmp_path):
    out = tmp_path / "dr"
    result = runner.invoke(app, ["align", str(align_data), "--model", str(lm_path), "--batch-size", "8",
                                 "--max-steps", "1", *SMALL, "--out", str(out), "--loss", "drdpo",
                                 "--beta-prime", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["loss_level"] == "batch" and summary["loss_params"]["beta_prime"] == 0.5
    train = summary["train"]
    assert train["loss_level"] == "batch" and train["loss"] <= train["dpo_row_loss"] + 1e-6  # Jensen


@pytest.fixture(scope="module")
def noisy_features(tmp_path_factory):
    frame, _ = corrupt_frame(feature_pairs(300, seed=3), NoiseSpec(kind="symmetric", rate=0.2, seed=3))
    path = tmp_path_factory.mktemp("data") / "noisy.parquet"
    write_table(frame, path, entry={"command": "corrupt", "parameters": {"rate": 0.2}})
    return path


def test_fit_reward_reports_eps_in_summaries_and_metrics(noisy_features, tmp_path):
    args = ["fit-reward", str(noisy_features), "--loss", "cdpo", "--eps", "0.3", "--epochs", "1"]
    human = runner.invoke(app, [*args, "--out", str(tmp_path / "h")])
    assert human.exit_code == 0, human.output
    assert "loss cdpo · ε 0.3" in human.output
    assert json.loads((tmp_path / "h" / "metrics.json").read_text())["loss_params"] == {"eps": 0.3}
    payload = runner.invoke(app, [*args, "--out", str(tmp_path / "j"), "--json"])
    assert payload.exit_code == 0, payload.output
    assert json.loads(payload.stdout)["loss_params"] == {"eps": 0.3}
