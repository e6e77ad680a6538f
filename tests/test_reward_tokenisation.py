"""Transformer reward models read real text faithfully: truncation keeps the response, padding and
pooling do not change a reward, and ``output_clip`` bounds the rewards as in the mlp backend."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.reward import load_reward_model, save_reward_model, score_table
from prefnoise.reward.fitting import FitResult
from prefnoise.reward.models import CONFIG_FILE
from prefnoise.reward.networks import PooledReward, SequenceReward
from prefnoise.reward.tokens import describe_truncation, encode_pairs
from prefnoise.reward.transformer import new_transformer
from tests.tiny_models import EOS, WORDS, make_tiny_causal_lm, make_tiny_encoder

LONG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(60))  # far more than 16 tokens
CORPUS = [LONG_PROMPT, "good answer here", "bad answer there", "question one", "the end of it"] * 3


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("gpt2"), CORPUS)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("bert"), CORPUS)


def plain_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- truncation --------------------------------------------------------------------------------


def test_decoder_long_prompt_keeps_both_responses(gpt2):
    model = new_transformer(gpt2, max_length=16)
    tok = model.tokenizer
    chosen, rejected = "good answer here", "bad answer there"
    [c_ids], [r_ids] = (model.prepare([LONG_PROMPT], [r], None, device=torch.device("cpu")) for r in (chosen, rejected))
    assert c_ids != r_ids  # joined-and-cut-right left both as the first 16 prompt tokens
    assert len(c_ids) == len(r_ids) == 16
    prompt, c_resp = plain_ids(tok, LONG_PROMPT), plain_ids(tok, chosen)
    assert c_ids[-len(c_resp):] == c_resp  # the whole response, at the end
    assert c_ids[: 16 - len(c_resp)] == prompt[len(prompt) - (16 - len(c_resp)):]  # the prompt's end
    assert model.last_truncation == {
        "rows": 1, "truncated": 1, "prompt_truncated": 1, "response_truncated": 0, "first_truncated_row": 0,
    }
    # so a long-prompt pair now has a margin (it was exactly 0)
    pairs = pl.DataFrame({C.PROMPT: [LONG_PROMPT] * 2, C.CHOSEN: [chosen, "the end"], C.REJECTED: [rejected, "one"]})
    scored = score_table(model, pairs, device="cpu")
    margin = (scored[C.chosen(C.REWARD)] - scored[C.rejected(C.REWARD)]).to_numpy()
    assert np.all(np.abs(margin) > 1e-6)


def test_short_pairs_are_untouched(gpt2, bert):
    for path in (gpt2, bert):
        model = new_transformer(path, max_length=64)
        ids, stats = encode_pairs(model.tokenizer, ["question one"], [" good answer here"], 64)
        tok = model.tokenizer
        if tok.sep_token is None:
            assert ids == [plain_ids(tok, "question one") + plain_ids(tok, " good answer here")]
        else:  # the tokenizer's own pair encoding, special tokens included
            assert ids == [tok("question one", " good answer here")["input_ids"]]
        assert stats["truncated"] == 0 and stats["first_truncated_row"] == -1


def test_encoder_cuts_the_prompt_from_the_left(bert):
    tok = new_transformer(bert, max_length=64).tokenizer
    fits = tok("question one", "the end of it")["input_ids"]
    limit = len(fits)  # the short pair fits exactly
    ids, stats = encode_pairs(tok, ["question one", LONG_PROMPT], ["the end of it", "good answer here"], limit)
    assert ids[0] == fits
    resp, prompt = plain_ids(tok, "good answer here"), plain_ids(tok, LONG_PROMPT)
    keep = limit - 3 - len(resp)  # [CLS] prompt [SEP] response [SEP]
    assert 0 < keep < len(prompt)
    assert ids[1] == [tok.cls_token_id, *prompt[-keep:], tok.sep_token_id, *resp, tok.sep_token_id]
    assert stats == {"rows": 2, "truncated": 1, "prompt_truncated": 1, "response_truncated": 0,
                     "first_truncated_row": 1}


def test_response_alone_too_long_is_cut_from_the_right(gpt2, bert):
    for path, reserved in ((gpt2, 0), (bert, 3)):
        tok = new_transformer(path, max_length=10).tokenizer
        ids, stats = encode_pairs(tok, ["question one"], [LONG_PROMPT], 10)
        body = plain_ids(tok, LONG_PROMPT)[: 10 - reserved]  # the response's start, no prompt left
        if reserved:
            assert ids[0] == [tok.cls_token_id, tok.sep_token_id, *body, tok.sep_token_id]
        else:
            assert ids[0] == body
        assert stats["prompt_truncated"] == 1 and stats["response_truncated"] == 1 and stats["truncated"] == 1


def test_a_vanished_response_is_an_error_naming_its_row(bert):
    tok = new_transformer(bert, max_length=3).tokenizer  # [CLS] [SEP] [SEP] leave no room
    with pytest.raises(PrefnoiseError, match=r"^row 1: the response \(\d+ tokens\) has no token left"):
        encode_pairs(tok, ["question one", "question one"], ["", "good answer"], 3)


def test_truncation_is_described_for_the_cli(gpt2):
    model = new_transformer(gpt2, max_length=16)
    stats = []
    for responses in (["good answer here", "one"], ["bad answer there", "the end"]):
        model.prepare([LONG_PROMPT, "question one"], responses, None, device=torch.device("cpu"))
        stats.append(model.last_truncation)
    assert describe_truncation(stats, 16) == (
        "truncated 2 of 4 prompt+response sequences to --max-length 16 "
        "(2 prompts cut from the left, 0 responses cut from the right)"
    )
    model.prepare(["question one"], ["one"], None, device=torch.device("cpu"))
    assert describe_truncation([model.last_truncation], 16) is None


# --- padding and pooling -----------------------------------------------------------------------


def rewards(model, rows):
    model.module.eval()
    with torch.no_grad():
        return model.module(**model.batch([rows], np.arange(len(rows)), torch.device("cpu"))).numpy()


def check_padding_invariance(model, short, long):
    alone = rewards(model, [short])[0]
    for batch in ([short, long], [long, short]):  # padded next to a longer sequence, either order
        np.testing.assert_allclose(rewards(model, batch)[batch.index(short)], alone, atol=1e-5)
    # the chosen and rejected sides stacked in one batch, as training does
    stacked = model.module(**model.batch([[short], [long]], np.arange(1), torch.device("cpu")))
    np.testing.assert_allclose(stacked.detach().numpy(), [alone, rewards(model, [long])[0]], atol=1e-5)
    return alone


@pytest.mark.parametrize("head", ["sequence-classification", "pooled"])
def test_decoder_padding_invariance_with_pad_equal_to_eos(gpt2, head):
    model = new_transformer(gpt2, max_length=64, head=head)
    torch.manual_seed(0)
    if head == "pooled":
        torch.nn.init.normal_(model.module.head.weight)
    else:
        torch.nn.init.normal_(model.module.model.score.weight)
    # GPT-2 style: no pad token of its own, so padding uses eos, and sequences end in eos
    model.tokenizer.pad_token = EOS
    eos = model.tokenizer.eos_token_id
    if head == "sequence-classification":
        model.module.model.config.pad_token_id = eos
    short = model.prepare(["question one"], [" good answer"], None, device=torch.device("cpu"))[0] + [eos]
    long = model.prepare([LONG_PROMPT], [" bad answer there"], None, device=torch.device("cpu"))[0] + [eos]
    alone = check_padding_invariance(model, short, long)
    if head == "sequence-classification":
        # the reward is read at the final eos, which transformers' own pooling skips as "padding"
        ids = torch.tensor([short])
        skipped = model.module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()
        assert abs(alone - skipped) > 1e-4
        # a trailing eos matters: the sequence without it has its own reward
        assert abs(rewards(model, [short[:-1]])[0] - alone) > 1e-4


@pytest.mark.parametrize("head", ["sequence-classification", "pooled"])
def test_encoder_padding_invariance(bert, head):
    model = new_transformer(bert, max_length=64, head=head)
    torch.manual_seed(0)
    linear = model.module.head if head == "pooled" else model.module.model.classifier
    torch.nn.init.normal_(linear.weight)
    [short] = model.prepare(["question one"], ["good answer"], None, device=torch.device("cpu"))
    [long] = model.prepare([LONG_PROMPT], ["bad answer there"], None, device=torch.device("cpu"))
    assert len(long) > len(short) + 5
    check_padding_invariance(model, short, long)


# --- output clip -------------------------------------------------------------------------------


@pytest.mark.parametrize("path_name, head", [("gpt2", "sequence-classification"), ("bert", "pooled")])
def test_output_clip_bounds_transformer_rewards(request, tmp_path, path_name, head):
    path = request.getfixturevalue(path_name)
    texts = pl.DataFrame({C.PROMPT: ["question one"] * 4, C.CHOSEN: ["good answer", "the end", "one", "here"],
                          C.REJECTED: ["bad answer", "of it", "there", "question"]})
    model = new_transformer(path, max_length=32, head=head, output_clip=0.5)
    linear = model.module.head if head == "pooled" else model.module.model.score
    torch.manual_seed(0)
    with torch.no_grad():
        linear.weight.normal_(std=1000.0)  # raw rewards in the thousands
    assert isinstance(model.module, (SequenceReward, PooledReward)) and model.module.output_clip == 0.5
    model.module.output_clip = None  # the same network unclipped gives huge rewards
    unclipped = score_table(model, texts, device="cpu")[C.chosen(C.REWARD)].abs()
    assert unclipped.max() > 10
    model.module.output_clip = 0.5
    scored = score_table(model, texts, device="cpu")
    both = pl.concat([scored[C.chosen(C.REWARD)], scored[C.rejected(C.REWARD)]]).abs()
    assert both.max() <= 0.5 and both.max() == pytest.approx(0.5)

    model.config.update(loss="sigmoid")
    save_reward_model(FitResult(model, {}), tmp_path / "rm", history=[])
    config_file = tmp_path / "rm" / CONFIG_FILE
    assert json.loads(config_file.read_text())["output_clip"] == 0.5
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.module.output_clip == 0.5
    again = score_table(loaded, texts, batch_size=3, device="cpu")
    np.testing.assert_allclose(again[C.chosen(C.REWARD)].to_numpy(), scored[C.chosen(C.REWARD)].to_numpy(), atol=1e-5)

    # a reward_config.json written before the clip existed still loads, unclipped
    config = json.loads(config_file.read_text())
    del config["output_clip"]
    config_file.write_text(json.dumps(config))
    old = load_reward_model(tmp_path / "rm")
    assert old.module.output_clip is None and old.config["output_clip"] is None
    assert score_table(old, texts, device="cpu")[C.chosen(C.REWARD)].abs().max() > 10

    config["output_clip"] = -1
    config_file.write_text(json.dumps(config))
    with pytest.raises(PrefnoiseError, match="output_clip is -1, not a number > 0 or null"):
        load_reward_model(tmp_path / "rm")
