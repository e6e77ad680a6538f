"""NaN and inf never flow silently through training and scoring.

A hostile-input sweep found: NaN/inf feature vectors trained and saved an all-NaN model (exit 0);
``--lr inf`` or a huge lr trained and saved garbage (fit-reward and align); ``score`` reported
"agreement 1.0000" from a model whose weights were NaN; NaN/inf hyperparameters slipped through
the library's validators (``nan > 0`` is False, but so is ``nan <= 0``). Each case is pinned here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise import columns as C
from prefnoise.data import canonicalize, read_table, write_table
from prefnoise.errors import PrefnoiseError
from prefnoise.policy import AlignConfig
from prefnoise.policy import train as align_train
from prefnoise.reward import fit_reward_model, load_reward_model, save_reward_model, score_responses, score_table
from prefnoise.reward.validate import check_finite_features
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import make_feature_pairs
from tests.option_helpers import option_error
from tests.tiny_models import make_tiny_encoder, pattern_pairs, pattern_texts

N = 120  # pairs in the feature tables
BAD_ROW = 17  # 1-based row of the poisoned vector
CHOSEN_F, REJECTED_F = C.chosen(C.FEATURES), C.rejected(C.FEATURES)
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def poisoned(value: float, *, column: str = CHOSEN_F, rows: tuple[int, ...] = (BAD_ROW,)) -> pl.DataFrame:
    """N feature pairs whose ``column`` holds ``value`` in entry 3 of the vectors at 1-based ``rows``."""
    frame = make_feature_pairs(N, dim=8, seed=1)
    vectors = frame[column].to_numpy().copy()
    for row in rows:
        vectors[row - 1, 3] = value
    return frame.with_columns(pl.Series(column, vectors, dtype=frame.schema[column]))


def table(tmp_path: Path, frame: pl.DataFrame, name: str = "pairs.parquet") -> Path:
    path = tmp_path / name
    write_table(frame, path, entry={"command": "test", "parameters": {}})
    return path


def read_table_of(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` in canonical form (pair_id first), as read_table returns a file."""
    return canonicalize(frame)[0]






def leftovers(directory: Path) -> list[str]:
    """Hidden temporaries (.NAME.tmp-*, .NAME.old-*) that a failed write would leave behind."""
    names = (p.name for p in directory.iterdir())
    return sorted(n for n in names if n.startswith(".") and (".tmp-" in n or ".old-" in n))


# --- feature columns ------------------------------------------------------------------------------


@pytest.mark.parametrize("shown", list(BAD_VALUES))
def test_non_finite_feature_stops_fit_reward_naming_column_and_row(tmp_path, shown):
    data = table(tmp_path, poisoned(BAD_VALUES[shown]))
    out = tmp_path / "rm"
    result = invoke("fit-reward", data, "--out", out, "--epochs", "2", "--device", "cpu")
    line = assert_one_line_error(
        result,
        f"column 'chosen_features' has a non-finite value ({shown}) at row {BAD_ROW}",
        "--drop-invalid",
    )
    assert "pair_id" in line  # the row is also named by its pair_id (stable across subsets)
    assert not out.exists() and leftovers(tmp_path) == []


def test_rejected_column_and_later_rows_are_counted_in_the_message():
    frame = read_table_of(poisoned(math.inf, column=REJECTED_F, rows=(5, 9, 30)))
    with pytest.raises(PrefnoiseError) as caught:
        fit_reward_model(frame, epochs=1, device="cpu", source="feats.parquet")
    assert caught.value.message.startswith(
        "feats.parquet: column 'rejected_features' has a non-finite value (inf) at row 5 (pair_id "
    )
    assert ", and 2 more row(s); fix it or pass --drop-invalid to skip such rows" in caught.value.message


def test_drop_invalid_skips_and_counts_the_rows_in_the_library():
    frame = read_table_of(poisoned(math.nan, rows=(3, 40)))
    result = fit_reward_model(frame, epochs=2, device="cpu", drop_invalid=True, seed=0)
    assert result.metrics["dropped"] == {"non-finite feature values": 2}
    assert result.metrics["train_pairs"] + result.metrics["val_pairs"] == N - 2
    assert all(bool(torch.isfinite(p).all()) for p in result.model.module.parameters())
    clean = fit_reward_model(read_table_of(make_feature_pairs(N, dim=8, seed=1)), epochs=2, device="cpu")
    assert clean.metrics["dropped"] == {}
    # scoring drops the same rows with drop_invalid, and names file, column and row without it
    scored = score_table(result.model, frame, device="cpu", drop_invalid=True)
    assert scored.height == N - 2 and scored[C.chosen(C.REWARD)].is_finite().all()
    expected = r"^in\.parquet: column 'chosen_features' has a non-finite value \(nan\) at row 3 "
    with pytest.raises(PrefnoiseError, match=expected):
        score_table(result.model, frame, device="cpu", source="in.parquet")


def test_null_vectors_and_null_entries_are_invalid_too():
    base = read_table_of(make_feature_pairs(6, dim=2, seed=0))
    vectors = [[0.5, 1.0], [0.5, None], None, [1.0, 2.0], [3.0, 4.0], [1.0, 1.0]]
    frame = base.with_columns(pl.Series(CHOSEN_F, vectors, dtype=pl.List(pl.Float64)))
    expected = r"^t: column 'chosen_features' has a missing value \(null\) at row 2 .*and 1 more"
    with pytest.raises(PrefnoiseError, match=expected):
        check_finite_features(frame, "t")
    kept, dropped = check_finite_features(frame, "t", True)
    assert dropped == 2 and kept[C.PAIR_ID].to_list() == base[C.PAIR_ID].gather([0, 3, 4, 5]).to_list()
    everything_bad = base.with_columns(pl.Series(CHOSEN_F, [[math.nan, 0.0]] * 6))
    with pytest.raises(PrefnoiseError, match="all 6 rows have non-finite feature values"):
        check_finite_features(everything_bad, "t", True)


def test_fit_reward_drop_invalid_skips_and_counts_the_row(tmp_path):
    data = table(tmp_path, poisoned(math.nan))
    out = tmp_path / "rm"
    result = invoke("fit-reward", data, "--out", out, "--epochs", "2", "--device", "cpu", "--drop-invalid")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dropped"] == {"non-finite feature values": 1}
    assert metrics["train_pairs"] + metrics["val_pairs"] == N - 1
    bad = invoke("fit-reward", data, "--out", tmp_path / "rm2", "--epochs", "2", "--device", "cpu")
    assert_one_line_error(bad, f"{data}: column 'chosen_features'")  # the message names the file


def test_score_refuses_non_finite_features(tmp_path):
    model_dir = tmp_path / "rm"
    fit = fit_reward_model(read_table_of(make_feature_pairs(N, dim=8, seed=1)), epochs=1, device="cpu")
    save_reward_model(fit, model_dir, history=[])
    data = table(tmp_path, poisoned(math.nan))
    dest = tmp_path / "scored.parquet"
    result = invoke("score", model_dir, data, dest, "--device", "cpu")
    assert_one_line_error(result, f"column 'chosen_features' has a non-finite value (nan) at row {BAD_ROW}")
    assert not dest.exists() and leftovers(tmp_path) == []


def test_audit_fold_models_refuse_non_finite_features(tmp_path):
    frame = poisoned(math.nan)
    data = table(tmp_path, frame)
    pair_id = read_table(data)[C.PAIR_ID][BAD_ROW - 1]
    result = invoke("audit", data, "--folds", "2", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "a.parquet")
    # fold models see a subset, so the row is named by its pair_id (the row number is the subset's)
    assert_one_line_error(result, "column 'chosen_features' has a non-finite value (nan)", f"pair_id {pair_id}")
    assert not (tmp_path / "a.parquet").exists()


# --- divergence -------------------------------------------------------------------------------------


def test_huge_lr_really_diverges_and_fit_reward_saves_nothing(tmp_path):
    frame = read_table_of(make_feature_pairs(N, dim=8, seed=1))
    with pytest.raises(PrefnoiseError) as caught:
        fit_reward_model(frame, epochs=3, lr=1e30, batch_size=32, device="cpu")
    # the first step's loss is finite (the weights are still the initial ones); the update overflows
    assert caught.value.message == (
        "training diverged: the loss became non-finite (nan) at epoch 1, step 2; lower --lr or check the data; "
        "nothing was saved"
    )
    data = table(tmp_path, frame)
    out = tmp_path / "rm"
    result = invoke(
        "fit-reward", data, "--out", out, "--lr", "1e30", "--epochs", "3", "--batch-size", "32", "--device", "cpu"
    )
    assert_one_line_error(result, "training diverged: the loss became non-finite (nan) at epoch 1", "nothing was saved")
    assert not out.exists() and leftovers(tmp_path) == []


def test_divergence_in_the_last_step_is_caught_before_returning():
    # one step, no validation: no later loss would show the overflowing weights; a probe batch does
    frame = read_table_of(make_feature_pairs(N, dim=8, seed=1))
    expected = r"^training diverged: the margins became non-finite \(nan\) after epoch 1, step 1;"
    with pytest.raises(PrefnoiseError, match=expected):
        fit_reward_model(frame, epochs=1, lr=1e30, batch_size=N, val_fraction=0.0, device="cpu")


def test_transformer_backend_stops_on_divergence(lm_path):
    texts = read_table_of(pattern_pairs(16, seed=2))
    with pytest.raises(PrefnoiseError, match=r"^training diverged: .* non-finite"):
        fit_reward_model(
            texts,
            backend="transformer",
            model_path=lm_path,
            epochs=2,
            lr=1e30,
            batch_size=8,
            max_length=24,
            val_fraction=0.0,
            device="cpu",
        )


def test_embed_mlp_backend_stops_on_divergence(tmp_path):
    encoder = make_tiny_encoder(tmp_path / "bert", pattern_texts())
    texts = read_table_of(pattern_pairs(32, seed=2))
    expected = r"^training diverged: the loss became non-finite \(nan\) at epoch 1, step 2;"
    with pytest.raises(PrefnoiseError, match=expected):
        fit_reward_model(
            texts,
            backend="embed+mlp",
            encoder_path=encoder,
            cache_dir=tmp_path / "cache",
            epochs=2,
            lr=1e30,
            batch_size=8,
            device="cpu",
        )


ALIGN_SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--device", "cpu", "--batch-size", "8"]


def test_align_with_a_diverging_lr_exits_2_and_saves_no_model(lm_path, tmp_path):
    data = tmp_path / "pairs.parquet"
    pattern_pairs(32, seed=8).write_parquet(data)
    out = tmp_path / "run"
    result = invoke(
        "align",
        data,
        "--model",
        lm_path,
        "--out",
        out,
        "--lr",
        "1e30",
        "--max-steps",
        "4",
        "--loss",
        "dpo",
        *ALIGN_SMALL,
    )
    assert_one_line_error(
        result, "training diverged: the loss became non-finite (nan) at epoch 1, step 2", "no model was saved"
    )
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert leftovers(tmp_path) == [] and (not out.exists() or leftovers(out) == [])


def test_align_library_stops_at_the_first_bad_step_and_logs_nothing_of_it(lm_path, tmp_path):
    out = tmp_path / "run"
    cfg = AlignConfig(
        model=str(lm_path),
        out=str(out),
        loss="sympo",
        lr=1e30,
        batch_size=8,
        max_steps=6,
        max_length=32,
        max_prompt_length=16,
        log_every=1,
        val_fraction=0.25,
        device="cpu",
    )
    with pytest.raises(PrefnoiseError) as caught:
        align_train(cfg, pattern_pairs(40, seed=8))
    assert caught.value.message.startswith("training diverged: the loss became non-finite (nan) at epoch 1, step 2;")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("val", 0), ("train", 1)]  # step 2 was never logged
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert not (out / "model").exists() and not (out / "summary.json").exists()


# --- damaged model ------------------------------------------------------------------------------------


def test_score_refuses_a_model_with_nan_weights(tmp_path):
    frame = read_table_of(make_feature_pairs(N, dim=8, seed=1))
    fit = fit_reward_model(frame, epochs=1, device="cpu")
    with torch.no_grad():
        fit.model.module.net[0].weight[0, 0] = math.nan
    model_dir = tmp_path / "rm"
    save_reward_model(fit, model_dir, history=[])
    data = table(tmp_path, frame)
    dest = tmp_path / "scored.parquet"
    result = invoke("score", model_dir, data, dest, "--device", "cpu")
    assert_one_line_error(
        result,
        f"the model produced non-finite rewards for {2 * N} responses (first at row 1); "
        "the model is damaged or diverged",
    )
    assert "agreement" not in result.output
    assert not dest.exists() and leftovers(tmp_path) == []
    loaded = load_reward_model(model_dir)
    with pytest.raises(PrefnoiseError, match=r"^rm: the model produced non-finite rewards for 120 responses"):
        long = pl.DataFrame({C.FEATURES: frame[CHOSEN_F]})
        score_responses(loaded, long, device="cpu", model_name="rm")


def test_non_finite_rewards_are_counted_per_response_and_located():
    frame = read_table_of(make_feature_pairs(N, dim=8, seed=1))
    fit = fit_reward_model(frame, epochs=1, device="cpu", output_clip=None)
    with torch.no_grad():  # a huge first-layer weight on feature 3: rewards overflow where it is large
        fit.model.module.net[0].weight.fill_(0.0)
        fit.model.module.net[0].weight[:, 3] = 3e38
        fit.model.module.net[-1].weight.fill_(1.0)
    x = torch.tensor(frame[CHOSEN_F].to_numpy())
    y = torch.tensor(frame[REJECTED_F].to_numpy())
    rewards = [fit.model.module(x), fit.model.module(y)]
    bad = ~torch.isfinite(torch.stack(rewards))
    assert 0 < int(bad.sum()) < 2 * N  # some responses overflow, not all
    first = int(bad.any(dim=0).nonzero()[0, 0]) + 1
    with pytest.raises(PrefnoiseError) as caught:
        score_table(fit.model, frame, device="cpu", model_name="m")
    assert caught.value.message.startswith(
        f"m: the model produced non-finite rewards for {int(bad.sum())} responses (first at row {first}); "
    )


# --- hyperparameters ------------------------------------------------------------------------------------

FIT_OPTIONS = [
    ("lr", math.nan, "--lr"),
    ("lr", math.inf, "--lr"),
    ("margin_scale", math.nan, "--margin-scale"),
    ("margin_scale", math.inf, "--margin-scale"),
    ("weight_decay", math.nan, "--weight-decay"),
    ("weight_decay", math.inf, "--weight-decay"),
    ("val_fraction", math.nan, "--val-fraction"),
    ("dropout", math.nan, "--dropout"),
    ("dropout", 1.0, "--dropout"),
    ("output_clip", math.nan, "--output-clip"),
    ("output_clip", math.inf, "--output-clip"),
    ("output_clip", -1.0, "--output-clip"),
    ("hidden", 0, "--hidden"),
    ("layers", -1, "--layers"),
    ("max_length", 0, "--max-length"),
    ("epochs", math.nan, "--epochs"),
    ("loss_params", {"eps": math.nan}, "--eps"),
    ("loss_params", {"tau": math.inf}, "--tau"),
    ("loss_params", {"alpha": math.inf}, "--alpha"),
]


@pytest.mark.parametrize(("option", "value", "flag"), FIT_OPTIONS, ids=[f"{o}={v}" for o, v, _ in FIT_OPTIONS])
def test_fit_reward_model_rejects_non_finite_and_out_of_range_options(option, value, flag):
    loss = {"--eps": "cdpo", "--tau": "ipo", "--alpha": "ropo"}.get(flag, "sigmoid")
    frame = read_table_of(make_feature_pairs(20, dim=4, seed=0))
    keyword = flag[2:].replace("-", "_")
    with option_error(f"^{flag} must be", f"^{keyword}= must be"):
        fit_reward_model(frame, **{"loss": loss, "device": "cpu", "epochs": 1, option: value})


def test_fit_reward_cli_rejects_lr_inf(tmp_path):
    data = table(tmp_path, make_feature_pairs(20, dim=4, seed=0))
    out = tmp_path / "rm"
    result = invoke("fit-reward", data, "--out", out, "--lr", "inf", "--device", "cpu")
    assert_one_line_error(result, "--lr must be a finite number", "got inf")
    assert not out.exists()


ALIGN_OPTIONS = [
    (name, value)
    for name in (
        "beta",
        "clip",
        "label_smoothing",
        "noise_rate",
        "tau",
        "alpha",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "lora_alpha",
        "lora_dropout",
        "val_fraction",
    )
    for value in (math.nan, math.inf)
] + [("alpha", 0.0), ("weight_decay", -1.0), ("max_grad_norm", -1.0), ("lora_dropout", 1.0), ("lora_alpha", 0.0)]


@pytest.mark.parametrize(("name", "value"), ALIGN_OPTIONS, ids=[f"{n}={v}" for n, v in ALIGN_OPTIONS])
def test_align_config_rejects_non_finite_and_out_of_range_options(name, value):
    AlignConfig(model="m", out="o")  # the defaults pass
    flag = "--" + name.replace("_", "-")
    with option_error(f"^{flag} must be", f"^{name}= must be"):
        AlignConfig(model="m", out="o", **{name: value})


def test_align_cli_rejects_nan_beta_before_writing(lm_path, tmp_path):
    data = tmp_path / "pairs.parquet"
    pattern_pairs(16, seed=8).write_parquet(data)
    out = tmp_path / "run"
    result = invoke("align", data, "--model", lm_path, "--out", out, "--beta", "nan", *ALIGN_SMALL)
    assert_one_line_error(result, "--beta must be a finite number, got nan")
    assert not (out / "model").exists()


def test_finite_inputs_train_and_score_as_before():
    frame = read_table_of(make_feature_pairs(N, dim=8, seed=1))
    fit = fit_reward_model(frame, epochs=3, device="cpu", seed=0)
    scored = score_table(fit.model, frame, device="cpu")
    assert scored.height == N and np.isfinite(scored[C.chosen(C.REWARD)].to_numpy()).all()
    assert fit.metrics["final"]["val_loss"] == pytest.approx(fit.metrics["epochs"][-1]["val_loss"])
