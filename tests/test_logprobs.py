"""Sequence log-probs, tokenization/truncation policy and the reference cache."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefnoise.errors import PrefnoiseError
from prefnoise.policy.logprobs import (
    REF_CHOSEN,
    REF_REJECTED,
    TokenizeSettings,
    collate,
    read_reference_cache,
    reference_fingerprint,
    reference_logps,
    sequence_logps,
    tokenize_pairs,
    truncate_pair,
    uses_chat_template,
    write_reference_cache,
)


@pytest.fixture(scope="module")
def lm(lm_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(lm_path).eval()
    return model, AutoTokenizer.from_pretrained(lm_path)


def token_by_token(model, prompt: list[int], response: list[int]) -> float:
    """Σ_t log p(response[t] | prompt + response[:t]), one unpadded forward per token."""
    total = 0.0
    with torch.no_grad():
        for t in range(len(response)):
            context = torch.tensor([prompt + response[:t]])
            logits = model(context).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[response[t]])
    return total


def test_truncate_pair_policy_by_hand():
    prompt, chosen, rejected = list(range(10)), [20, 21, 22], [30, 31, 32, 33, 34]
    # fits: nothing cut
    assert truncate_pair(prompt, chosen, rejected, 15, 4) == (prompt, chosen, rejected, False)
    # 10 + 5 > 12: prompt keeps its last max(12 − 5, 4) = 7 tokens, responses untouched
    assert truncate_pair(prompt, chosen, rejected, 12, 4) == (list(range(3, 10)), chosen, rejected, True)
    # 10 + 5 > 7: prompt keeps max(7 − 5, 4) = 4 (left-truncated), responses keep 7 − 4 = 3
    assert truncate_pair(prompt, chosen, rejected, 7, 4) == ([6, 7, 8, 9], chosen, [30, 31, 32], True)


def test_tokenize_pairs_adds_bos_eos_counts_truncation_and_names_empty_pair(lm):
    _, tok = lm
    frame = pl.DataFrame({
        "prompt": ["red cat ?", "blue " * 30], "chosen": [" yes dog", " yes sun"],
        "rejected": [" no fish", " no moon moon"], "pair_id": ["a", "b"],
    })
    pairs = tokenize_pairs(frame, tok, TokenizeSettings(max_length=16, max_prompt_length=8))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert pairs.prompt_ids[0] == [bos, *tok("red cat ?", add_special_tokens=False)["input_ids"]]
    assert pairs.chosen_ids[0] == [*tok(" yes dog", add_special_tokens=False)["input_ids"], eos]
    assert pairs.truncated_rows == 1  # only the 30-word prompt
    assert pairs.prompt_ids[1][-1] == tok("blue " * 30, add_special_tokens=False)["input_ids"][-1]
    assert len(pairs.prompt_ids[1]) + len(pairs.rejected_ids[1]) <= 16
    with pytest.raises(PrefnoiseError, match="pair b: chosen response is empty after truncation"):
        tokenize_pairs(frame.with_columns(pl.col("chosen").str.replace(" yes sun", "")),
                       tok, TokenizeSettings(16, 8))


def test_chat_template_is_used_for_conversational_data(tmp_path):
    path = make_tiny_causal_lm(tmp_path / "chat", pattern_texts(), chat_template=True)
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "red cat ?"}]
    frame = pl.DataFrame({"prompt": ["user: red cat ?"], "prompt_messages": [json.dumps(messages)],
                          "chosen": [" yes"], "rejected": [" no"], "pair_id": ["c"]})
    assert uses_chat_template(frame, tok)
    pairs = tokenize_pairs(frame, tok, TokenizeSettings(64, 32, chat_template=True))
    rendered = "<|user|>red cat ?<|end|><|assistant|>"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert pairs.prompt_ids[0] == [tok.bos_token_id, *tok(rendered, add_special_tokens=False)["input_ids"]]
    plain = make_tiny_causal_lm(tmp_path / "plain", pattern_texts())
    assert not uses_chat_template(frame, AutoTokenizer.from_pretrained(plain))


@pytest.mark.parametrize("left_pad", [False, True])
def test_sequence_logps_match_token_by_token(lm, left_pad):
    model, tok = lm
    prompts = [[0, 5, 9, 12, 40], [0, 7], [0, 3, 3, 3]]
    responses = [[50, 51, 0], [60, 61, 62, 63, 64, 65, 0], [70, 0]]
    batch = collate(prompts, responses, pad_id=tok.pad_token_id, left_pad=left_pad)
    # prompt tokens and padding are masked: 3, 7 and 2 response tokens scored
    assert batch["labels_mask"].sum(1).tolist() == [3, 7, 2]
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
    expected = [token_by_token(model, p, r) for p, r in zip(prompts, responses)]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_sequence_logps_after_truncation_scores_only_kept_tokens(lm):
    model, tok = lm
    frame = pattern_pairs(3, seed=1).with_columns(pl.col("prompt") + " " + pl.col("prompt"))
    pairs = tokenize_pairs(frame, tok, TokenizeSettings(max_length=12, max_prompt_length=6))
    assert pairs.truncated_rows == 3
    batch = collate(pairs.prompt_ids, pairs.chosen_ids, tok.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
    expected = [token_by_token(model, p, c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)]
    assert all(len(p) + len(c) <= 12 for p, c in zip(pairs.prompt_ids, pairs.chosen_ids))
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_reference_pass_equals_fresh_logps_and_cache_round_trips(lm, lm_path, tmp_path):
    model, tok = lm
    frame = pattern_pairs(7, seed=2)
    settings = TokenizeSettings(64, 32)
    pairs = tokenize_pairs(frame, tok, settings)
    ref = reference_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=3)
    assert ref["pair_id"].to_list() == frame["pair_id"].to_list()
    fresh = [token_by_token(model, p, r) for p, r in zip(pairs.prompt_ids, pairs.rejected_ids)]
    assert ref[REF_REJECTED].to_list() == pytest.approx(fresh, abs=1e-4)

    fingerprint = reference_fingerprint(lm_path, settings, "fp32")
    assert fingerprint == reference_fingerprint(lm_path, settings, "fp32")
    assert fingerprint != reference_fingerprint(lm_path, TokenizeSettings(64, 16), "fp32")
    path = tmp_path / "ref.parquet"
    write_reference_cache(ref, path, fingerprint)
    wanted = pairs.subset(range(6, -1, -1))
    cached = read_reference_cache(path, fingerprint, wanted)
    assert cached["pair_id"].to_list() == wanted.pair_ids
    assert cached[REF_CHOSEN].to_list() == list(reversed(ref[REF_CHOSEN].to_list()))
    assert read_reference_cache(path, "other-model", wanted) is None  # stale fingerprint
    more = tokenize_pairs(pattern_pairs(8, seed=2), tok, settings)
    assert read_reference_cache(path, fingerprint, more) is None  # a pair not in the cache
    flipped = tokenize_pairs(frame.rename({"chosen": "rejected", "rejected": "chosen"}), tok, settings)
    assert flipped.pair_ids == pairs.pair_ids
    assert read_reference_cache(path, fingerprint, flipped) is None  # same pair_id, responses swapped
    assert read_reference_cache(tmp_path / "missing.parquet", fingerprint, wanted) is None
