"""GPU-marked checks (``pytest -m gpu``; ``bench/device.sh`` runs them on a CUDA machine; skipped elsewhere).

Tolerances, stated once here:

- bf16 autocast vs fp32, one batch of a tiny GPT-2 (policy = reference + N(0, 0.02²) noise): the mean
  per-row loss within ``LOSS_TOL`` = 0.005 absolute, the sequence log-probs within ``LOGP_TOL`` = 0.02
  nats per scored token (bf16 keeps 8 significant bits: ~0.4% per product), and the gradients of the
  two losses pointing the same way (cosine >= 0.995). On a CPU (bf16 autocast there) the differences
  were 2e-5, 1.4e-3 and 0.99999.
- reward scores on cuda (bf16 autocast) vs the same model on the CPU (fp32): within 0.02 + 2% of the value.
- cached reference log-probs of a cuda run (bf16 autocast, the GPU default) vs an fp32 CPU pass: within
  ``LOGP_TOL`` per scored token; a second cuda run reads the cache back (no second pass).
"""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.policy import AlignConfig, loss_of, response_tokens, train
from prefnoise.policy.logprobs import (
    REF_CHOSEN,
    REF_REJECTED,
    TokenizeSettings,
    collate_pairs,
    pair_logps,
    tokenize_pairs,
)
from tests.tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOSS_TOL = 0.005
LOGP_TOL = 0.02  # nats per scored token
GRAD_COSINE = 0.995


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "gpt2", pattern_texts(), n_embd=64, n_layer=2)


def bf16_parity(lm_path, device: str, loss: str) -> dict[str, float]:
    """fp32 and bf16-autocast forward + backward of one batch (as align's loop runs them): the
    differences of the mean loss, of the log-probs per scored token, and the gradients' cosine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_path)
    frame = pattern_pairs(32, seed=3)
    pairs = tokenize_pairs(frame, tok, TokenizeSettings(32, 16))
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, list(range(len(pairs))), tok.pad_token_id).items()}
    reference = AutoModelForCausalLM.from_pretrained(lm_path).to(device).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator).to(device))
        ref_chosen, ref_rejected = pair_logps(reference, batch)
    cfg = AlignConfig(model=str(lm_path), out="unused", loss=loss, beta=0.1,
                      **({"label_smoothing": 0.1} if loss == "cdpo" else {}))
    tokens = response_tokens(batch)
    results = {}
    for precision in ("fp32", "bf16"):
        policy.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            chosen, rejected = pair_logps(policy, batch)
        losses, _, _ = loss_of(cfg, chosen, rejected, ref_chosen, ref_rejected, tokens)
        losses.mean().backward()
        grad = torch.cat([p.grad.reshape(-1).float() for p in policy.parameters() if p.grad is not None])
        results[precision] = (losses.mean().item(), torch.cat([chosen, rejected]).detach().float(), grad)
    (loss32, logp32, grad32), (loss16, logp16, grad16) = results["fp32"], results["bf16"]
    scored = torch.cat(tokens).to(logp32.device).clamp(min=1)
    return {
        "loss_difference": abs(loss16 - loss32),
        "logp_per_token": float(((logp16 - logp32).abs() / scored).max()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)),
        "loss_fp32": loss32,
    }


@pytest.mark.parametrize("loss", ["sympo", "dpo"])
def test_bf16_autocast_loss_matches_fp32(lm_path, loss):
    found = bf16_parity(lm_path, "cuda", loss)
    assert found["loss_fp32"] > 0
    assert found["loss_difference"] <= LOSS_TOL, found
    assert found["logp_per_token"] <= LOGP_TOL, found
    assert found["grad_cosine"] >= GRAD_COSINE, found


def test_reward_model_fits_and_scores_on_cuda():
    from prefnoise.noise import NoiseSpec, corrupt_frame
    from prefnoise.reward import fit_reward_model, score_table
    from prefnoise.reward.synthetic import feature_pairs

    frame, _ = corrupt_frame(feature_pairs(1500, seed=7), NoiseSpec(kind="symmetric", rate=0.2, seed=7))
    result = fit_reward_model(frame, loss="sigmoid", epochs=4, seed=1, device="cuda")
    assert next(result.model.module.parameters()).device.type == "cuda"
    assert result.metrics["final"]["val_clean_accuracy"] > 0.8  # 20% flipped labels, clean accuracy measured
    on_gpu = score_table(result.model, frame, device="cuda")
    on_cpu = score_table(result.model, frame, device="cpu")
    for side in (C.chosen(C.REWARD), C.rejected(C.REWARD)):
        gpu, cpu = on_gpu[side].to_numpy(), on_cpu[side].to_numpy()
        assert np.isfinite(gpu).all()
        np.testing.assert_allclose(gpu, cpu, rtol=0.02, atol=0.02)


def test_align_on_cuda_writes_and_reuses_the_reference_cache(lm_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefnoise.policy.logprobs import reference_logps

    frame = pattern_pairs(24, seed=5)
    base = dict(model=str(lm_path), lr=1e-3, batch_size=8, max_steps=2, max_length=32, max_prompt_length=16,
                log_every=1, device="cuda")  # precision auto: bf16 autocast on the GPU, as users get it
    first = train(AlignConfig(out=str(tmp_path / "run"), **base), frame)
    assert not first["ref_cache_hit"] and np.isfinite(first["train"]["loss"])
    cache = pl.read_parquet(tmp_path / "run" / "ref_logps.parquet")
    tok = AutoTokenizer.from_pretrained(lm_path)
    pairs = tokenize_pairs(frame, tok, TokenizeSettings(32, 16))
    on_cpu = reference_logps(AutoModelForCausalLM.from_pretrained(lm_path), pairs, pad_id=tok.pad_token_id)
    for column, side in ((REF_CHOSEN, pairs.chosen_ids), (REF_REJECTED, pairs.rejected_ids)):
        scored = np.array([len(r) for r in side], dtype=float)
        per_token = np.abs(cache[column].to_numpy() - on_cpu[column].to_numpy()) / scored
        assert per_token.max() <= LOGP_TOL, column
    again = train(AlignConfig(out=str(tmp_path / "again"), ref_cache=str(tmp_path / "run" / "ref_logps.parquet"),
                              **base), frame)
    assert again["ref_cache_hit"] and np.isfinite(again["train"]["loss"])
