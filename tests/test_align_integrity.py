"""align runs stay faithful to their inputs: resume checks data and model, the reference cache key
covers weight-file stats, the format version and the chat date, and pair_ids are checked."""

from __future__ import annotations

import datetime
import json
import os

import polars as pl
import pytest
from tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import chat_template_utils

import prefnoise.policy.logprobs as logprobs
import prefnoise.policy.plan as plan_module
from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.policy import AlignConfig, assemble_reference, check_pair_ids, prepare, train
from prefnoise.policy.logprobs import (
    REF_CHOSEN,
    REF_REJECTED,
    TokenizeSettings,
    read_reference_cache,
    reference_fingerprint,
    reference_logps,
    tokenize_pairs,
    write_reference_cache,
)

DATED_TEMPLATE = (  # Llama 3.x style: date_string if given, else strftime_now
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "<|system|>Today Date: {{ date_string }}<|end|>"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CLOCK_TEMPLATE = (  # strftime_now only, in another format
    "<|system|>{{ strftime_now('%Y-%m-%d') }}<|end|>"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def config(model, out, **overrides) -> AlignConfig:
    base = dict(model=str(model), out=str(out), lr=1e-3, batch_size=4, max_steps=4, max_length=32,
                max_prompt_length=16, log_every=1, device="cpu")
    return AlignConfig(**{**base, **overrides})


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def on_log(record):
        if record["split"] == "train" and record["step"] == step:
            raise Interrupt
    return on_log


def interrupted_run(model, out, frame, **options) -> None:
    """A run stopped after step 3 with a checkpoint at step 2."""
    with pytest.raises(Interrupt):
        train(config(model, out, save_every=2, **options), frame, on_log=stop_at(3))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


# --- 1. resume checks the data and the model ------------------------------------------------------

def test_resume_refuses_other_data_and_other_model_then_resumes_the_same(tmp_path):
    model = make_tiny_causal_lm(tmp_path / "lm", pattern_texts())
    frame = pattern_pairs(16, seed=11)
    out = tmp_path / "run"
    interrupted_run(model, out, frame)
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert state["step"] == 2 and state["data"]["pairs"] == 16 and state["chat_date"] is None
    size, mtime, digest = state["model"]["config.json"]
    assert size == (model / "config.json").stat().st_size and mtime == (model / "config.json").stat().st_mtime_ns
    assert len(digest) == 32 and "model.safetensors" in state["model"]

    flipped = frame.with_columns(chosen=pl.when(pl.int_range(16) == 5).then(pl.col(C.REJECTED))
                                 .otherwise(pl.col(C.CHOSEN)),
                                 rejected=pl.when(pl.int_range(16) == 5).then(pl.col(C.CHOSEN))
                                 .otherwise(pl.col(C.REJECTED)))
    with pytest.raises(PrefnoiseError, match=r"^--resume: the data differs from the checkpoint's \(the same "
                       r"pair_ids, but the text or the labels of some pairs changed\); use the same data or "
                       r"start over with --overwrite$"):
        train(config(model, out, save_every=2, resume=True), flipped)
    with pytest.raises(PrefnoiseError, match=r"the data differs from the checkpoint's \(15 pairs now, 16 then\)"):
        train(config(model, out, save_every=2, resume=True), frame.head(15))
    renamed = frame.with_columns(pl.col(C.PAIR_ID).str.replace("p11", "x11"))
    with pytest.raises(PrefnoiseError, match=r"\(the same number of pairs \(16\) but other pair_ids"):
        train(config(model, out, save_every=2, resume=True), renamed)

    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place: same bytes
    with pytest.raises(PrefnoiseError, match=r"^--resume: the model differs from the checkpoint's "
                       r"\(model\.safetensors was modified since\); use the same --model or start over"):
        train(config(model, out, save_every=2, resume=True), frame)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg_file = model / "config.json"
    cfg_st, text = cfg_file.stat(), cfg_file.read_text()
    cfg_file.write_text(text.replace('"n_layer": 2', '"n_layer":  2'))  # same model, other bytes
    with pytest.raises(PrefnoiseError, match=r"\(config\.json has other content\)"):
        train(config(model, out, save_every=2, resume=True), frame)
    cfg_file.write_text(text)
    os.utime(cfg_file, ns=(cfg_st.st_atime_ns, cfg_st.st_mtime_ns))
    # nothing of the run was touched by the refusals
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]

    resumed = train(config(model, out, save_every=2, resume=True), frame)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4


# --- 2. reference-cache key: weight stats and format version ----------------------------------------

def test_reference_cache_misses_after_weight_rewrite_or_format_bump(tmp_path, monkeypatch):
    model = make_tiny_causal_lm(tmp_path / "lm", pattern_texts())
    tok = AutoTokenizer.from_pretrained(model)
    settings = TokenizeSettings(32, 16)
    pairs = tokenize_pairs(pattern_pairs(6, seed=12), tok, settings)
    ref = reference_logps(AutoModelForCausalLM.from_pretrained(model), pairs, pad_id=tok.pad_token_id)
    cache = tmp_path / "ref.parquet"
    key = reference_fingerprint(model, settings, "fp32")
    write_reference_cache(ref, cache, key)
    assert read_reference_cache(cache, reference_fingerprint(model, settings, "fp32"), pairs) is not None

    weights = model / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(weights.read_bytes())  # rewritten in place: same size, same bytes, new mtime
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert weights.stat().st_size == before.st_size
    touched = reference_fingerprint(model, settings, "fp32")
    assert touched != key and read_reference_cache(cache, touched, pairs) is None
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert reference_fingerprint(model, settings, "fp32") == key  # the same stats: the same key

    monkeypatch.setattr(logprobs, "LOGPROB_FORMAT_VERSION", logprobs.LOGPROB_FORMAT_VERSION + 1)
    bumped = reference_fingerprint(model, settings, "fp32")
    assert bumped != key and read_reference_cache(cache, bumped, pairs) is None


# --- 3. a chat template that renders today's date ---------------------------------------------------

class Clock(datetime.datetime):
    """transformers' strftime_now reads ``datetime.now()``: this one says ``Clock.day``."""

    day = datetime.datetime(2024, 7, 26, 23, 59)

    @classmethod
    def now(cls, tz=None):
        return cls.day


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    monkeypatch.setattr(Clock, "day", datetime.datetime(2024, 7, 26, 23, 59))
    monkeypatch.setattr(plan_module, "today", lambda: Clock.day.strftime(logprobs.CHAT_DATE_FORMAT))
    return Clock


def dated_model(path, template: str):
    model = make_tiny_causal_lm(path, pattern_texts(), chat_template=True)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template
    tok.save_pretrained(model)
    return model


def chat_pairs(n: int, seed: int) -> pl.DataFrame:
    frame = pattern_pairs(n, seed=seed)
    messages = [json.dumps([{"role": "user", "content": p}]) for p in frame[C.PROMPT]]
    return frame.with_columns(pl.Series(C.PROMPT_MESSAGES, messages))


def test_dated_template_tokenizes_the_same_across_a_day_change_within_a_run(tmp_path, clock):
    model = dated_model(tmp_path / "lm", DATED_TEMPLATE)
    frame = chat_pairs(8, seed=13)
    cfg = config(model, tmp_path / "run", max_length=128, max_prompt_length=96)
    tok = AutoTokenizer.from_pretrained(model)
    day1 = prepare(cfg, frame)
    assert day1.plan.chat_date == "26 Jul 2024" and day1.pairs.settings.chat_date == "26 Jul 2024"
    assert "Today Date: 26 Jul 2024" in tok.decode(day1.pairs.prompt_ids[0])

    clock.day = datetime.datetime(2024, 7, 27, 0, 1)  # midnight passes
    same_run = prepare(cfg, frame, chat_date=day1.plan.chat_date)
    assert same_run.pairs.prompt_ids == day1.pairs.prompt_ids
    assert same_run.pairs.content_keys() == day1.pairs.content_keys()
    fresh = prepare(cfg, frame)  # a new run takes the new day, so the template does depend on it
    assert fresh.plan.chat_date == "27 Jul 2024" and fresh.pairs.prompt_ids != day1.pairs.prompt_ids
    assert reference_fingerprint(model, fresh.pairs.settings, "fp32") != \
        reference_fingerprint(model, day1.pairs.settings, "fp32")

    plain = prepare(cfg, frame.drop(C.PROMPT_MESSAGES))  # no template applied: no date kept
    assert plain.plan.chat_date is None


def test_strftime_now_template_sees_the_run_date_not_the_clock(tmp_path, clock):
    model = dated_model(tmp_path / "lm", CLOCK_TEMPLATE)
    frame = chat_pairs(4, seed=14)
    cfg = config(model, tmp_path / "run", max_length=128, max_prompt_length=96)
    tok = AutoTokenizer.from_pretrained(model)
    clock.day = datetime.datetime(2025, 1, 2, 12, 0)
    run = prepare(cfg, frame, chat_date="31 Dec 2024")
    assert run.plan.chat_date == "31 Dec 2024"
    assert tok.decode(run.pairs.prompt_ids[0]).startswith("<|endoftext|><|system|>2024-12-31<|end|>")
    assert chat_template_utils.datetime is Clock  # the clock is put back


def test_resume_on_the_next_day_reuses_the_run_date(tmp_path, clock):
    model = dated_model(tmp_path / "lm", DATED_TEMPLATE)
    frame = chat_pairs(16, seed=15)
    out = tmp_path / "run"
    options = dict(max_length=128, max_prompt_length=96)
    interrupted_run(model, out, frame, **options)
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert state["chat_date"] == "26 Jul 2024"
    clock.day = datetime.datetime(2024, 7, 27, 9, 0)
    summary = train(config(model, out, save_every=2, resume=True, **options), frame)
    assert summary["resumed_from_step"] == 2 and summary["chat_date"] == "26 Jul 2024"
    assert summary["ref_cache_hit"]  # the same date: the same tokens and the same cache key
    assert json.loads((out / "summary.json").read_text())["chat_date"] == "26 Jul 2024"


# --- 4. pair_id uniqueness ------------------------------------------------------------------------------

def test_pair_id_shared_by_different_pairs_is_refused_naming_it_and_its_rows(lm_path, tmp_path):
    frame = pattern_pairs(12, seed=16)
    ids = frame[C.PAIR_ID].to_list()
    ids[7] = ids[9] = ids[2]
    clashing = frame.with_columns(pl.Series(C.PAIR_ID, ids))
    with pytest.raises(PrefnoiseError, match=r"^pairs\.parquet: pair_id 'p16-00002' is shared by rows 3, 8, 10 "
                       r"whose prompts, responses or labels differ \(1 such pair_id\(s\)\); give each distinct "
                       r"pair its own pair_id$"):
        prepare(config(lm_path, tmp_path / "run"), clashing, source="pairs.parquet")
    assert not (tmp_path / "run").exists()
    flagged = pl.concat([frame, frame.head(1).with_columns(flipped=pl.lit(True))], how="diagonal")
    with pytest.raises(PrefnoiseError, match=r"pair_id 'p16-00000' is shared by rows 1, 13"):
        check_pair_ids(flagged)  # same text, other label


def test_exact_duplicate_rows_train_and_each_row_keeps_its_reference(lm_path, tmp_path):
    frame = pattern_pairs(12, seed=17)
    doubled = pl.concat([frame, frame.head(4)])  # rows 13..16 repeat rows 1..4 exactly
    check_pair_ids(doubled)
    summary = train(config(lm_path, tmp_path / "run", max_steps=1), doubled)
    assert summary["rows"] == 16
    cache = pl.read_parquet(tmp_path / "run" / "ref_logps.parquet")
    assert cache[C.PAIR_ID].to_list() == doubled[C.PAIR_ID].to_list()
    assert cache[REF_CHOSEN].to_list()[12:] == cache[REF_CHOSEN].to_list()[:4]
    tok = AutoTokenizer.from_pretrained(lm_path)
    fresh = reference_logps(AutoModelForCausalLM.from_pretrained(lm_path),
                            tokenize_pairs(doubled, tok, TokenizeSettings(32, 16)), pad_id=tok.pad_token_id)
    assert cache[REF_REJECTED].to_list() == pytest.approx(fresh[REF_REJECTED].to_list(), abs=1e-5)

    # two processes' shards gathered: rows sharing a pair_id keep their own values (by row index)
    schema = {C.PAIR_ID: pl.String, "content_key": pl.String, REF_CHOSEN: pl.Float64, REF_REJECTED: pl.Float64}
    shard0 = [(0, ("a", "k0", -1.0, -2.0)), (2, ("a", "k2", -5.0, -6.0))]
    shard1 = [(1, ("b", "k1", -3.0, -4.0)), (3, ("a", "k3", -7.0, -8.0))]
    ref = assemble_reference(shard0 + shard1, 4, schema)
    assert ref[REF_CHOSEN].to_list() == [-1.0, -3.0, -5.0, -7.0]
    assert ref["content_key"].to_list() == ["k0", "k1", "k2", "k3"]
    with pytest.raises(PrefnoiseError, match=r"no log-probs for rows \[3\]"):
        assemble_reference(shard0 + shard1[:1], 4, schema)
