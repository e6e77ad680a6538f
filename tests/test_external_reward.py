"""Any reward model: a plain sequence-classification checkpoint (num_labels=1, as TRL's RewardTrainer saves
it) or a hub id in the local Hugging Face cache scores like a fit-reward directory, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.reward.tokens import encode_pairs
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts

N = 6
REVISION = "0123456789abcdef0123456789abcdef01234567"


def save_like_trl(lm: Path, out: Path, *, num_labels: int = 1, seed: int = 0) -> Path:
    """What TRL's RewardTrainer leaves: the LM loaded as AutoModelForSequenceClassification(num_labels), saved
    with its tokenizer (and chat template)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():  # a visible head, so rewards differ clearly between responses
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama LM with a chat template, its TRL-style reward model, and the same rows as plain text
    (Parquet) and as TRL conversational messages (JSONL)."""
    root = tmp_path_factory.mktemp("external")
    lm = make_tiny_causal_lm(root / "lm", pattern_texts(), arch="llama", chat_template=True)
    rm = save_like_trl(lm, root / "rm")
    pairs = pattern_pairs(N)
    plain = root / "plain.parquet"
    pairs.drop(C.PAIR_ID).write_parquet(plain)
    chat = root / "chat.jsonl"
    with chat.open("w", encoding="utf-8") as handle:
        for prompt, chosen, rejected in pairs.select(C.PROMPT, C.CHOSEN, C.REJECTED).rows():
            handle.write(json.dumps({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}],
            }) + "\n")
    return {"lm": lm, "rm": rm, "plain": plain, "chat": chat, "root": root}


def own_rewards(rm: Path, sequences: list[list[int]]) -> list[float]:
    """The checkpoint's own forward (transformers, one unpadded sequence at a time): logits[0, 0]."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in sequences]


def score(model, data: Path, out: Path) -> pl.DataFrame:
    result = invoke("score", model, data, out, "--json", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["backend"], summary["rows"], summary["model"]) == ("transformer", N, str(model))
    return pl.read_parquet(out)


def test_a_trl_saved_reward_model_scores_conversations_through_its_chat_template(built, tmp_path):
    from transformers import AutoTokenizer

    scored = score(built["rm"], built["chat"], tmp_path / "out.parquet")
    tokenizer = AutoTokenizer.from_pretrained(built["rm"])
    rows = [json.loads(line) for line in built["chat"].read_text().splitlines()]
    for side in ("chosen", "rejected"):
        ids = [tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=True, return_dict=True)["input_ids"]
               for r in rows]
        assert tokenizer.decode(ids[0]).startswith("<|user|>q0")
        expected = own_rewards(built["rm"], ids)
        assert scored[C.rejected(C.REWARD) if side == "rejected" else C.chosen(C.REWARD)].to_list() == pytest.approx(
            expected, abs=1e-5)
    assert len(set(scored[C.chosen(C.REWARD)].to_list())) == N  # real, distinct rewards


def test_plain_text_rows_score_as_prompt_then_response(built, tmp_path):
    from transformers import AutoTokenizer

    scored = score(built["rm"], built["plain"], tmp_path / "out.parquet")
    tokenizer = AutoTokenizer.from_pretrained(built["rm"])
    ids, _ = encode_pairs(tokenizer, scored[C.PROMPT].to_list(), scored[C.CHOSEN].to_list(), 10_000)
    assert scored[C.chosen(C.REWARD)].to_list() == pytest.approx(own_rewards(built["rm"], ids), abs=1e-5)


def test_rank_check_with_a_model_scores_first(built, tmp_path):
    scored = tmp_path / "scored.parquet"
    score(built["rm"], built["plain"], scored)
    expected = invoke("rank-check", scored, "--json", "--bootstrap", "50")
    direct = invoke("rank-check", built["plain"], "--model", built["rm"], "--json", "--bootstrap", "50")
    assert direct.exit_code == expected.exit_code == 0, direct.output
    assert {**json.loads(direct.stdout), "input": None} == {**json.loads(expected.stdout), "input": None}


def hub_cache(home: Path, repo_id: str, model: Path) -> None:
    """``model`` laid out in ``home``/hub as huggingface_hub caches a download: blobs, snapshot links, refs/main."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(p for p in model.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{number:040x}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline, read through the environment as from_pretrained reads it."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def test_a_hub_id_absent_from_the_cache_is_one_line(offline_home, built, tmp_path):
    out = tmp_path / "out.parquet"
    result = invoke("score", "someorg/absent-reward-model", built["plain"], out)
    line = assert_one_line_error(result, "someorg/absent-reward-model: not found locally or in the Hugging Face cache",
                                 "offline", str(offline_home / "hub"), "(hf download someorg/absent-reward-model)")
    assert "huggingface-cli" not in line  # the installed hub library ships `hf`, not huggingface-cli
    assert_nothing_written(out)


def test_a_hub_id_in_the_cache_loads_like_its_directory(offline_home, built, tmp_path):
    hub_cache(offline_home, "tinyorg/tiny-rm", built["rm"])
    from_hub = score("tinyorg/tiny-rm", built["chat"], tmp_path / "hub.parquet")
    local = score(built["rm"], built["chat"], tmp_path / "local.parquet")
    assert from_hub[C.chosen(C.REWARD)].to_list() == local[C.chosen(C.REWARD)].to_list()


def test_checkpoints_without_a_single_score_are_refused(built, tmp_path):
    two = save_like_trl(built["lm"], tmp_path / "two-labels", num_labels=2)
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("score", two, built["plain"], out), "2 labels", "num_labels=1")
    assert_one_line_error(invoke("score", built["lm"], built["plain"], out), "LlamaForCausalLM has no reward head")
    custom = shutil.copytree(built["rm"], tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert_one_line_error(invoke("score", custom, built["plain"], out), "custom code")
    assert_nothing_written(out)


def test_fit_reward_and_audit_take_a_cached_hub_id_as_their_base_model(offline_home, built, tmp_path):
    hub_cache(offline_home, "tinyorg/tiny-lm", built["lm"])
    out = tmp_path / "rm"
    result = invoke("fit-reward", built["plain"], "--model", "tinyorg/tiny-lm", "--out", out, "--epochs", "1",
                    "--val-fraction", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "reward_config.json").read_text())["base_model"].endswith(REVISION)
    for command in (["fit-reward", "--out", tmp_path / "rm2"], ["audit"]):
        error = invoke(command[0], built["plain"], "--model", "tinyorg/absent", *command[1:])
        assert_one_line_error(error, "--model tinyorg/absent: not found locally or in the Hugging Face cache")
    assert not (tmp_path / "rm2").exists()
