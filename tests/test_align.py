"""The align trainer: losses by hand from the model's logits, learning, cache reuse, exact resume, LoRA."""

from __future__ import annotations

import json
import math
import time

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

import prefnoise.policy.reference as reference_module
from prefnoise.policy import AlignConfig, learning_rate, loss_of, response_tokens, reward_accuracy, train
from prefnoise.policy.logprobs import (
    REF_CHOSEN,
    TokenizeSettings,
    collate_pairs,
    pair_logps,
    reference_logps,
    tokenize_pairs,
)


def config(lm_path, out, **overrides) -> AlignConfig:
    base = dict(model=str(lm_path), out=str(out), lr=1e-3, batch_size=8, max_steps=4, max_length=32,
                max_prompt_length=16, log_every=1, device="cpu")
    return AlignConfig(**{**base, **overrides})


def token_logp(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt) from one unpadded forward of the model's own logits."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    return sum(float(logps[len(prompt) + t - 1, tok]) for t, tok in enumerate(response))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


BETA, EPS, ALPHA, CLIP = 0.5, 0.2, 14.0, 0.1  # rewards here are ~0.1: the clip binds for some
HAND = {  # loss name, options → ℓ as a function of (z, unclipped rewards rc, rr)
    ("sympo", "sigmoid"): lambda z, rc, rr: sig(-(max(-CLIP, min(CLIP, rc)) - max(-CLIP, min(CLIP, rr)))),
    ("sympo", "ramp"): lambda z, rc, rr: min(1.0, max(0.0, 0.5 - 0.5 * (
        max(-CLIP, min(CLIP, rc)) - max(-CLIP, min(CLIP, rr))))),
    ("dpo", None): lambda z, rc, rr: -logsig(z),
    ("cdpo", None): lambda z, rc, rr: -(1 - EPS) * logsig(z) - EPS * logsig(-z),
    ("rdpo", None): lambda z, rc, rr: (-(1 - EPS) * logsig(z) + EPS * logsig(-z)) / (1 - 2 * EPS),
    ("ipo", None): lambda z, rc, rr: (z / BETA - 1 / (2 * BETA)) ** 2,  # τ = β; rewards averaged per token
    ("drdpo", None): lambda z, rc, rr: -logsig(z),  # per-row DPO ℓ; the batch objective is drdpo_loss
    ("ropo", None): lambda z, rc, rr: 4 * ALPHA / (ALPHA + 1) ** 2 * -logsig(z)
    + 4 * ALPHA**2 / (ALPHA + 1) ** 2 * sig(-z),
    ("hinge", None): lambda z, rc, rr: max(0.0, 1.0 - z),
}


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("ref") / "gpt2", pattern_texts(), seed=1)


@pytest.mark.parametrize(("loss", "symmetric"), list(HAND))
def test_loss_of_one_batch_matches_hand_computation(lm_path, reference_path, tmp_path, loss, symmetric):
    tok = AutoTokenizer.from_pretrained(lm_path)
    policy = AutoModelForCausalLM.from_pretrained(lm_path).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_path).eval()
    pairs = tokenize_pairs(pattern_pairs(5, seed=3), tok, TokenizeSettings(32, 16))
    ref = reference_logps(reference, pairs, pad_id=tok.pad_token_id, batch_size=2)
    batch = collate_pairs(pairs, range(5), tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, batch)
    cfg = config(lm_path, tmp_path, loss=loss, symmetric_loss=symmetric or "sigmoid", beta=BETA, clip=CLIP,
                 label_smoothing=EPS, noise_rate=EPS, alpha=ALPHA)
    losses, _, _ = loss_of(cfg, chosen, rejected, torch.tensor(ref[REF_CHOSEN].to_numpy()).float(),
                           torch.tensor(ref["ref_rejected_logp"].to_numpy()).float(), response_tokens(batch))
    expected = []
    for i in range(5):
        p, c, r = pairs.prompt_ids[i], pairs.chosen_ids[i], pairs.rejected_ids[i]
        rc = BETA * (token_logp(policy, p, c) - token_logp(reference, p, c))
        rr = BETA * (token_logp(policy, p, r) - token_logp(reference, p, r))
        if loss == "ipo":  # TRL's IPO: each response's log-ratio averaged over its tokens
            rc, rr = rc / len(c), rr / len(r)
        expected.append(HAND[(loss, symmetric)](rc - rr, rc, rr))
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if loss == "sympo":  # the clip must actually bind for the sympo cases to test it
        assert any(abs(BETA * (token_logp(policy, pairs.prompt_ids[i], pairs.chosen_ids[i])
                               - token_logp(reference, pairs.prompt_ids[i], pairs.chosen_ids[i]))) > CLIP
                   for i in range(5))


def test_learning_rate_schedules_and_reward_accuracy_by_hand(lm_path, tmp_path):
    cfg = config(lm_path, tmp_path, lr=1.0, warmup_steps=3, schedule="linear")
    assert [learning_rate(s, 13, cfg) for s in (0, 2, 3, 8)] == pytest.approx([0.25, 0.75, 1.0, 0.5])
    cfg = cfg.replace(schedule="cosine")  # a frozen options object: a checked copy
    assert learning_rate(8, 13, cfg) == pytest.approx(0.5) and learning_rate(3, 13, cfg) == 1.0
    z = torch.tensor([1.0, -2.0, 0.0, 3.0])
    assert reward_accuracy(z) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert reward_accuracy(z, torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx((1 + 1 + 0.5 + 0) / 4)


def test_held_out_reward_accuracy_rises_from_chance_to_above_0_9(lm_path, tmp_path):
    started = time.perf_counter()
    cfg = config(lm_path, tmp_path / "run", batch_size=16, max_steps=25, val_fraction=0.25, eval_every=5,
                 log_every=5, lr=2e-3)
    summary = train(cfg, pattern_pairs(320, seed=4))
    elapsed = time.perf_counter() - started
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["step"] == 0 and 0.4 <= val[0]["reward_accuracy"] <= 0.6
    assert val[-1]["step"] == 25 and val[-1]["reward_accuracy"] > 0.9
    assert summary["val"]["reward_accuracy"] == val[-1]["reward_accuracy"]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25]
    assert set(train_records[0]) >= {"loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward",
                                     "tokens_per_s", "lr"}
    assert train_records[-1]["chosen_reward"] > 0 > train_records[-1]["rejected_reward"]
    assert (tmp_path / "run" / "model" / "config.json").is_file() and elapsed < 60


def test_second_run_reuses_reference_cache_and_skips_the_pass(lm_path, tmp_path, monkeypatch):
    frame = pattern_pairs(24, seed=5)
    first = train(config(lm_path, tmp_path / "run", max_steps=1), frame)
    assert not first["ref_cache_hit"]
    cache = pl.read_parquet(tmp_path / "run" / "ref_logps.parquet")
    tok = AutoTokenizer.from_pretrained(lm_path)
    fresh = reference_logps(AutoModelForCausalLM.from_pretrained(lm_path),
                            tokenize_pairs(frame, tok, TokenizeSettings(32, 16)), pad_id=tok.pad_token_id)
    assert cache[REF_CHOSEN].to_list() == pytest.approx(fresh[REF_CHOSEN].to_list(), abs=1e-5)

    def no_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran although the cache was valid")

    monkeypatch.setattr(reference_module, "reference_logps", no_pass)
    second = train(config(lm_path, tmp_path / "run", max_steps=1, loss="dpo"), frame)
    assert second["ref_cache_hit"]
    shared = tmp_path / "shared-cache.parquet"
    (tmp_path / "run" / "ref_logps.parquet").rename(shared)
    third = train(config(lm_path, tmp_path / "other", max_steps=1, ref_cache=str(shared)), frame)
    assert third["ref_cache_hit"] and not (tmp_path / "other" / "ref_logps.parquet").exists()
    with pytest.raises(AssertionError, match="reference pass ran"):  # other tokenization → stale cache
        train(config(lm_path, tmp_path / "other", max_steps=1, ref_cache=str(shared), max_length=30), frame)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_with_the_same_weights(lm_path, tmp_path):
    frame = pattern_pairs(40, seed=6)
    options = dict(max_steps=7, grad_accum=2, batch_size=4, save_every=2, warmup_steps=2, schedule="cosine")
    straight = train(config(lm_path, tmp_path / "a", **options), frame)

    def stop_at_step_5(record):
        if record["split"] == "train" and record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(lm_path, tmp_path / "b", **options), frame, on_log=stop_at_step_5)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = train(config(lm_path, tmp_path / "b", resume=True, **options), frame)
    assert resumed["resumed_from_step"] == 4 and straight["resumed_from_step"] is None
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(lm_path / "model.safetensors")
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    drop_speed = [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines_a]
    assert drop_speed == [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines_b]
    assert straight["train"]["loss"] == resumed["train"]["loss"]


def test_lora_reference_is_the_base_model_and_saves_merged_or_adapter(lm_path, tmp_path):
    frame = pattern_pairs(24, seed=7)
    full = train(config(lm_path, tmp_path / "full", max_steps=1), frame)
    lora = train(config(lm_path, tmp_path / "lora", max_steps=3, lora_r=4, lr=1e-2), frame)
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 2
    base_cache = pl.read_parquet(tmp_path / "full" / "ref_logps.parquet")
    lora_cache = pl.read_parquet(tmp_path / "lora" / "ref_logps.parquet")
    assert lora_cache[REF_CHOSEN].to_list() == pytest.approx(base_cache[REF_CHOSEN].to_list(), abs=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    base = AutoModelForCausalLM.from_pretrained(lm_path)
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(merged.transformer.wpe.weight, base.transformer.wpe.weight)  # LoRA leaves it alone
    train(config(lm_path, tmp_path / "adapter", max_steps=1, lora_r=4, save_adapter=True), frame)
    assert (tmp_path / "adapter" / "model" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model" / "model.safetensors").exists()


def test_max_prompt_length_defaults_to_half_of_a_short_max_length():
    from prefnoise.options.align import AlignConfig

    where = {"model": "m", "out": "o"}
    assert AlignConfig(**where).max_prompt_length == 256  # the default for the default --max-length 512
    short = AlignConfig(**where, max_length=256)
    assert short.max_prompt_length == 128
    assert short.max_length == 256  # a shorter --max-length alone is a valid configuration
    assert AlignConfig(**where, max_length=256, max_prompt_length=200).max_prompt_length == 200
