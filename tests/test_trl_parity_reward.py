"""The transformer reward backend tokenizes rows as TRL's RewardTrainer does, or differs as documented.

TRL's side is built without training: ``RewardTrainer._prepare_dataset`` (its own add-EOS, tokenize
and max-length filter steps) on a ``datasets.Dataset`` of the same TRL-format rows that prefnoise
reads, with the same tokenizer. The differences asserted here are the ones the README lists under
"Differences from TRL's RewardTrainer".
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from prefnoise import columns as C
from prefnoise.data import read_table
from prefnoise.reward.scoring import prepare_sides as _prepare_sides
from prefnoise.reward.tokens import encode_pairs
from prefnoise.reward.transformer import new_transformer
from tests.tiny_models import pattern_pairs

pytest.importorskip("trl")
pytest.importorskip("datasets")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CPU = torch.device("cpu")
N = 6


@pytest.fixture(scope="module")
def chat_lm(lm_path, tmp_path_factory):
    """A copy of the tiny GPT-2 whose tokenizer has a ChatML-like chat template."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat") / "gpt2-chat"
    shutil.copytree(lm_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return path


def trl_rows(conversational: bool) -> list[dict]:
    """TRL-format rows: standard (text, responses after a space) or conversational (explicit prompt)."""
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(pattern_pairs(N).select(C.PROMPT, C.CHOSEN, C.REJECTED).rows()):
        if i == 0:  # one long prompt, so a small max-length has something to cut
            prompt = prompt + " " + " ".join(["red blue green"] * 8)
        if conversational:
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
            rows.append({
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}],
            })
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def trl_ids(tokenizer, rows: list[dict], max_length: int | None) -> dict[int, tuple[list[int], list[int]]]:
    """Row index -> (chosen_ids, rejected_ids) of the rows TRL keeps, by TRL's own dataset processing."""
    from datasets import Dataset
    from trl import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    args = RewardConfig(output_dir="unused", max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_list([{**row, "row": i} for i, row in enumerate(rows)])
    out = RewardTrainer._prepare_dataset(None, dataset, tokenizer, args, "train")
    return {r["row"]: (list(r["chosen_ids"]), list(r["rejected_ids"])) for r in out}


def prefnoise_ids(model_dir, rows: list[dict], max_length: int, tmp_path):
    """(model, [chosen ids, rejected ids]) as fit-reward builds them from the same rows written as JSONL."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = new_transformer(model_dir, max_length=max_length)
    sides = _prepare_sides(model, read_table(data), CPU, None)
    return model, sides


@pytest.mark.parametrize("with_template", [False, True])
def test_standard_rows_differ_from_trl_only_by_its_eos(lm_path, chat_lm, with_template, tmp_path):
    rows = trl_rows(conversational=False)
    model, (chosen, rejected) = prefnoise_ids(chat_lm if with_template else lm_path, rows, 1024, tmp_path)
    eos = model.tokenizer.eos_token_id
    trl = trl_ids(model.tokenizer, rows, 1024)
    assert sorted(trl) == list(range(N))
    for i in range(N):  # TRL tokenizes prompt + response + EOS as one string; prefnoise adds no EOS
        assert trl[i] == (chosen[i] + [eos], rejected[i] + [eos])
    assert sum(s["truncated"] for s in model.truncation) == 0


def test_conversational_rows_with_a_chat_template_match_trl_exactly(chat_lm, tmp_path):
    rows = trl_rows(conversational=True)
    model, (chosen, rejected) = prefnoise_ids(chat_lm, rows, 1024, tmp_path)
    trl = trl_ids(model.tokenizer, rows, 1024)
    assert sorted(trl) == list(range(N))
    for i in range(N):
        assert trl[i] == (chosen[i], rejected[i])
    text = model.tokenizer.decode(chosen[1])
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n" + rows[1]["chosen"][0]["content"] + "<|im_end|>\n")
    assert sum(s["truncated"] for s in model.truncation) == 0


def test_conversational_rows_without_a_template_are_rendered_text(lm_path, tmp_path):
    rows = trl_rows(conversational=True)
    model, (chosen, _) = prefnoise_ids(lm_path, rows, 1024, tmp_path)
    with pytest.raises(ValueError, match="chat template"):  # TRL cannot tokenize them at all
        trl_ids(model.tokenizer, rows, 1024)
    table = read_table(tmp_path / "rows.jsonl")
    assert table[C.PROMPT][1] == "system: be brief\n\nuser: " + rows[1]["prompt"][1]["content"]
    expected, _ = encode_pairs(model.tokenizer, table[C.PROMPT].to_list(), table[C.CHOSEN].to_list(), 1024)
    assert chosen == expected


@pytest.mark.parametrize("conversational", [False, True])
def test_small_max_length_trl_drops_long_rows_prefnoise_cuts_the_prompt(lm_path, chat_lm, conversational, tmp_path):
    rows = trl_rows(conversational)
    model_dir = chat_lm if conversational else lm_path
    full = trl_ids(new_transformer(model_dir, max_length=8).tokenizer, rows, None)
    if not conversational:  # compare without TRL's EOS (see the test above)
        full = {i: (c[:-1], r[:-1]) for i, (c, r) in full.items()}
    longest_other = max(max(len(c), len(r)) for i, (c, r) in full.items() if i != 0)
    max_length = longest_other + 2
    assert min(len(full[0][0]), len(full[0][1])) > max_length  # row 0, the long prompt, does not fit
    model, (chosen, rejected) = prefnoise_ids(model_dir, rows, max_length, tmp_path)
    trl = trl_ids(model.tokenizer, rows, max_length)
    assert sorted(trl) == list(range(1, N))  # TRL filters row 0 out of the dataset
    for i in range(1, N):  # rows that fit are untouched (standard rows: up to TRL's EOS)
        assert (chosen[i], rejected[i]) == full[i]
        if conversational:
            assert trl[i] == full[i]
    # prefnoise keeps row 0, cut to max_length from the left: the prompt's end and the whole response
    assert chosen[0] == full[0][0][-max_length:] and rejected[0] == full[0][1][-max_length:]
    tail = model.tokenizer.decode(chosen[0])
    assert tail.endswith(rows[0]["chosen"][0]["content"] + "<|im_end|>\n" if conversational else rows[0]["chosen"])
    for stats in model.truncation:
        assert stats == {"rows": N, "truncated": 1, "prompt_truncated": 1, "response_truncated": 0,
                         "first_truncated_row": 0}


def test_conversational_response_alone_too_long_is_cut_from_the_right(chat_lm, tmp_path):
    rows = trl_rows(conversational=True)[1:2]
    full = trl_ids(new_transformer(chat_lm, max_length=8).tokenizer, rows, None)[0][0]
    model, (chosen, _) = prefnoise_ids(chat_lm, rows, 4, tmp_path)
    prompt_len = len(model.tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"])
    assert chosen[0] == full[prompt_len : prompt_len + 4]
    assert model.truncation[0]["response_truncated"] == 1 and model.truncation[0]["prompt_truncated"] == 1


def test_fit_reward_and_score_a_conversational_table_through_the_cli(chat_lm, tmp_path, monkeypatch):
    from prefnoise.cli import app
    from prefnoise.reward import transformer as models

    templated = []
    real = models.encode_chat_pairs

    def spy(tokenizer, messages, responses, max_length):
        templated.append(len(responses))
        return real(tokenizer, messages, responses, max_length)

    monkeypatch.setattr(models, "encode_chat_pairs", spy)

    rows = [r for _ in range(4) for r in trl_rows(conversational=True)]  # 24 rows
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    runner = CliRunner()
    out = tmp_path / "rm"
    fit = runner.invoke(app, ["fit-reward", str(data), "--model", str(chat_lm), "--out", str(out), "--epochs", "1",
                              "--max-length", "48", "--val-fraction", "0.25", "--json"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.stdout)["backend"] == "transformer"
    assert sum(templated) == 2 * len(rows)  # both sides of every row went through the chat template
    scored_path = tmp_path / "scored.parquet"
    score = runner.invoke(app, ["score", str(out), str(data), str(scored_path)])
    assert score.exit_code == 0, score.output
    assert sum(templated) == 4 * len(rows)
    scored = pl.read_parquet(scored_path)
    assert scored.height == len(rows) and scored[C.chosen(C.REWARD)].null_count() == 0
    # written back in TRL's conversational format; reading it gives the prompt messages again
    assert scored.schema[C.PROMPT] == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    assert C.PROMPT_MESSAGES not in scored.columns
    from prefnoise.data import read_table

    assert C.PROMPT_MESSAGES in read_table(scored_path).columns
