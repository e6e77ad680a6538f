"""Token parity with TRL's DPOTrainer: the ids and loss masks ``prefnoise align`` builds from
standard (plain-text) and conversational rows equal what TRL 1.x builds from the same rows and
tokenizer, apart from the differences documented in README ("Differences from TRL"), which are
asserted here as such.

The TRL side runs TRL's own code without training: ``DPOTrainer._prepare_dataset`` (prompt
extraction, EOS, tokenization through the chat template) on a ``datasets.Dataset`` with a
``DPOConfig``, then ``DataCollatorForPreference`` (``max_length`` truncation, completion mask).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import polars as pl
import pytest
from transformers import AutoTokenizer

from prefnoise import columns as C
from prefnoise.data import read_table
from prefnoise.policy.logprobs import TokenizeSettings, collate_pairs, pad_token_id, tokenize_pairs, uses_chat_template
from tests.tiny_models import pattern_pairs

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(lm_path, tmp_path_factory):
    """The tiny GPT-2 tokenizer (BOS = EOS, not added by the tokenizer itself, as GPT-2) and copies."""
    base = AutoTokenizer.from_pretrained(lm_path)
    chat_dir = tmp_path_factory.mktemp("chat-tok")
    chat = AutoTokenizer.from_pretrained(lm_path)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    chat.save_pretrained(chat_dir)
    chat = AutoTokenizer.from_pretrained(chat_dir)
    out = {"gpt2": base, "chat": chat}
    for name in list(out):
        no_bos = AutoTokenizer.from_pretrained(lm_path if name == "gpt2" else chat_dir)
        no_bos.bos_token = None  # a tokenizer without BOS (as Qwen's): prefnoise adds none either
        out[f"{name}-nobos"] = no_bos
    return out


def standard_rows(n: int = 5) -> list[dict]:
    rows = pattern_pairs(n, seed=3).drop(C.PAIR_ID).to_dicts()
    rows[1]["chosen"] += "<|endoftext|>"  # already EOS-terminated: TRL adds no second EOS
    return rows


def conversational_rows(n: int = 5) -> list[dict]:
    text = [{k: v.replace("<|endoftext|>", "").strip() for k, v in r.items()} for r in standard_rows(n)]
    return [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in text
    ]


def prefnoise_side(rows: list[dict], tok, tmp_path, max_length: int = 512, max_prompt_length: int = 256):
    """prefnoise's pairs and collated batch, the rows read through ``read_table`` as a user's file."""
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    frame = read_table(path)
    if C.PAIR_ID not in frame.columns:
        frame = frame.with_columns(pl.Series(C.PAIR_ID, [f"r{i}" for i in range(frame.height)]))
    settings = TokenizeSettings(max_length, max_prompt_length, uses_chat_template(frame, tok))
    pairs = tokenize_pairs(frame, tok, settings)
    return pairs, collate_pairs(pairs, range(len(pairs)), pad_token_id(tok))


def trl_side(rows: list[dict], tok, tmp_path, max_length: int | None = 1024):
    """TRL's tokenized dataset and collated batch (DPOConfig defaults apart from ``max_length``)."""
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=max_length, report_to=[],
                     bf16=False, use_cpu=True)  # CPU test: no bf16; tokenization defaults untouched
    dataset = DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(rows), tok, args, "train"
    )
    collator = DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode
    )
    return dataset, collator(list(dataset)) if len(dataset) else None


def sequences(batch: dict, mask_key: str) -> list[tuple[list[int], list[int]]]:
    """Per row: the unpadded input ids and the mask of the tokens that count in the log-prob sum."""
    out = []
    for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch[mask_key], strict=True):
        keep = attention.bool()
        out.append((ids[keep].tolist(), mask[keep].tolist()))
    return out


def with_bos(tok, seqs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Documented difference: prefnoise starts every prompt with the tokenizer's BOS, TRL only when
    the tokenizer (or the template) adds it. A tokenizer without BOS: nothing to add."""
    if tok.bos_token_id is None:
        return seqs
    return [([tok.bos_token_id, *ids], [0, *mask]) for ids, mask in seqs]


@pytest.mark.parametrize("kind", ["standard", "conversational"])
@pytest.mark.parametrize("name", ["gpt2", "gpt2-nobos", "chat", "chat-nobos"])
def test_untruncated_ids_and_masks_match_trl(tokenizers, tmp_path, kind, name):
    tok = tokenizers[name]
    rows = standard_rows() if kind == "standard" else conversational_rows()
    if kind == "conversational" and tok.chat_template is None:
        # Documented difference: TRL needs a chat template for conversational rows; prefnoise
        # tokenizes them as the standard rows of its rendered text ("role: content" turns).
        with pytest.raises(ValueError, match="chat"):
            trl_side(rows, tok, tmp_path)
        pairs, batch = prefnoise_side(rows, tok, tmp_path)
        as_text = [{"prompt": "system: be brief\n\nuser: " + r["prompt"][1]["content"],
                    "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]} for r in rows]
        _, trl_batch = trl_side(as_text, tok, tmp_path)
        assert sequences(batch, "labels_mask") == with_bos(tok, sequences(trl_batch, "completion_mask"))
        return
    pairs, batch = prefnoise_side(rows, tok, tmp_path)
    dataset, trl_batch = trl_side(rows, tok, tmp_path)
    assert pairs.settings.chat_template == (kind == "conversational")
    head = [] if tok.bos_token_id is None else [tok.bos_token_id]
    assert pairs.prompt_ids == [head + p for p in dataset["prompt_ids"]]
    assert pairs.chosen_ids == dataset["chosen_ids"]
    assert pairs.rejected_ids == dataset["rejected_ids"]
    assert sequences(batch, "labels_mask") == with_bos(tok, sequences(trl_batch, "completion_mask"))
    if kind == "standard":  # one EOS closes each response, also where the text already had it
        assert all(r[-1] == tok.eos_token_id and r[-2] != tok.eos_token_id for r in pairs.chosen_ids)
    else:  # the template's end of turn closes it, no EOS added
        end = tok.convert_tokens_to_ids("<|im_end|>")
        assert all(r[-2] == end and tok.eos_token_id not in r for r in pairs.chosen_ids + pairs.rejected_ids)


@pytest.mark.parametrize("kind", ["standard", "conversational"])
@pytest.mark.parametrize("name", ["chat", "chat-nobos"])
def test_truncated_responses_match_trl_keep_start(tokenizers, tmp_path, kind, name):
    """Responses cut at max_length (the prompt fits): TRL's default keep_start, token for token.
    prefnoise's BOS counts toward max_length, so it matches TRL with one token less."""
    tok = tokenizers[name]
    rows = standard_rows() if kind == "standard" else conversational_rows()
    longest_prompt = max(map(len, prefnoise_side(rows, tok, tmp_path)[0].prompt_ids))
    length = longest_prompt + 2  # every prompt fits; responses keep 2 to 3 tokens
    pairs, batch = prefnoise_side(rows, tok, tmp_path, max_length=length, max_prompt_length=longest_prompt)
    assert pairs.truncated_rows == len(rows)
    bos = tok.bos_token_id is not None
    _, trl_batch = trl_side(rows, tok, tmp_path, max_length=length - bos)
    assert sequences(batch, "labels_mask") == with_bos(tok, sequences(trl_batch, "completion_mask"))


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_long_prompts_keep_their_end_unlike_trl(tokenizers, tmp_path, kind):
    """Documented difference: when prompt + response exceeds max_length, prefnoise cuts the prompt
    from the left (keeping at least max_prompt_length tokens, more if the longer response fits
    beside them), then the responses' ends; TRL 1.x (no max_prompt_length) keeps the start of
    prompt + response, and drops a row whose prompt alone fills max_length (prefnoise keeps it)."""
    tok = tokenizers["chat-nobos"]  # no BOS: the truncation difference alone
    rows = standard_rows(3) if kind == "standard" else conversational_rows(3)
    long = " ".join(["red cat blue"] * 8) + " "
    for row in rows:
        if kind == "standard":
            row["prompt"] = long + row["prompt"]
        else:
            row["prompt"][1]["content"] = long + row["prompt"][1]["content"]
    dataset, full = trl_side(rows, tok, tmp_path, max_length=None)
    shortest = min(map(len, dataset["prompt_ids"]))
    length, prompt_min = shortest + 4, shortest - 10
    pairs, batch = prefnoise_side(rows, tok, tmp_path, max_length=length, max_prompt_length=prompt_min)
    _, trl_batch = trl_side(rows, tok, tmp_path, max_length=length)
    assert pairs.truncated_rows == len(rows)
    trl_seqs = sequences(trl_batch, "completion_mask")
    for i, (prompt, chosen) in enumerate(zip(dataset["prompt_ids"], dataset["chosen_ids"], strict=True)):
        keep = max(length - max(len(chosen), len(dataset["rejected_ids"][i])), prompt_min)
        assert keep < len(prompt)
        assert pairs.prompt_ids[i] == prompt[-keep:]  # prefnoise: the end of the prompt
        assert pairs.chosen_ids[i] == chosen[:length - keep]
        ids, mask = trl_seqs[i]
        assert ids == (prompt + chosen)[:length] and sum(mask) == length - len(prompt)  # TRL: the start
        assert trl_seqs[i] == tuple(x[:length] for x in sequences(full, "completion_mask")[i])
    assert sequences(batch, "labels_mask") != trl_seqs

    dropped, _ = trl_side(rows, tok, tmp_path, max_length=shortest - 2)  # prompts fill max_length
    assert len(dropped) == 0
    kept, _ = prefnoise_side(rows, tok, tmp_path, max_length=shortest - 2, max_prompt_length=prompt_min)
    assert len(kept) == len(rows) and all(len(p) + len(c) <= shortest - 2
                                          for p, c in zip(kept.prompt_ids, kept.chosen_ids, strict=True))


def test_plain_text_prompt_and_response_are_tokenized_apart_unlike_trl(tokenizers, tmp_path):
    """Documented difference: prefnoise tokenizes prompt and response apart, TRL as one string, so
    a token merging across the boundary (a prompt ending with a space) splits them differently."""
    tok = tokenizers["gpt2-nobos"]
    rows = [{"prompt": r["prompt"] + " ", "chosen": r["chosen"].replace("<|endoftext|>", "").lstrip(),
             "rejected": r["rejected"].lstrip()}
            for r in standard_rows(3)]
    pairs, _ = prefnoise_side(rows, tok, tmp_path)
    dataset, _ = trl_side(rows, tok, tmp_path)
    ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    assert pairs.prompt_ids == ids
    assert pairs.chosen_ids == [tok(r["chosen"])["input_ids"] + [tok.eos_token_id] for r in rows]
    assert dataset["prompt_ids"] == [p[:-1] for p in ids]  # TRL: the trailing space joins the response
    assert [tok.decode(c) for c in dataset["chosen_ids"]] == [" " + r["chosen"] + tok.eos_token for r in rows]
