"""Held out means held out: split, the pairs a model saw, and agreement on unseen rows only."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.data import read_history, read_table, write_table
from prefnoise.heldout import TRAINING_PAIRS_FILE, agreement_summary, split_table
from prefnoise.reward.synthetic import feature_pairs

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    frame = feature_pairs(300, seed=2).with_columns(prompt=pl.format("prompt {}", pl.int_range(pl.len()) // 5))
    path = tmp_path_factory.mktemp("heldout") / "pairs.parquet"
    write_table(frame, path)
    return path


def test_split_is_deterministic_prompt_disjoint_and_order_free(pairs_path):
    frame = read_table(pairs_path)
    train, test = split_table(frame, test_fraction=0.25, seed=3)
    assert train.height + test.height == frame.height
    assert not set(train["prompt"].to_list()) & set(test["prompt"].to_list())
    assert 0.1 < test["prompt"].n_unique() / frame["prompt"].n_unique() < 0.4  # 60 prompts, 25% expected
    again_train, again_test = split_table(frame.sample(fraction=1.0, shuffle=True, seed=9), test_fraction=0.25, seed=3)
    assert sorted(again_test["pair_id"].to_list()) == sorted(test["pair_id"].to_list())
    other = split_table(frame, test_fraction=0.25, seed=4)[1]
    assert sorted(other["pair_id"].to_list()) != sorted(test["pair_id"].to_list())
    by_pair = split_table(frame, test_fraction=0.25, seed=3, by="pair")[1]
    assert set(by_pair["prompt"].to_list()) & set(train["prompt"].to_list())  # pairs of one prompt may split


def test_split_cli_writes_both_sides_with_provenance(pairs_path, tmp_path):
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    result = run("split", pairs_path, train, test, "--test-fraction", "0.2", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shared_prompts"] == 0 and summary["train"]["rows"] + summary["test"]["rows"] == 300
    assert read_history(test)[-1]["command"] == "split"
    assert read_history(test)[-1]["parameters"] == {"test_fraction": 0.2, "by": "prompt", "part": "test"}
    assert run("split", pairs_path, train, train, "--overwrite").exit_code == 2
    bad_fraction = run("split", pairs_path, tmp_path / "a.parquet", tmp_path / "b.parquet", "--test-fraction", "1")
    assert bad_fraction.exit_code == 2


def test_training_pairs_are_recorded_marked_and_kept_apart(pairs_path, tmp_path):
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    assert run("split", pairs_path, train, test, "--test-fraction", "0.3", "--seed", "2").exit_code == 0
    model = tmp_path / "rm"
    assert run("fit-reward", train, "--out", model, "--epochs", "3", "--hidden", "16").exit_code == 0
    recorded = pl.read_parquet(model / TRAINING_PAIRS_FILE)
    metrics = json.loads((model / "metrics.json").read_text())
    counts = dict(recorded.group_by("split").len().iter_rows())
    assert counts == {"train": metrics["train_pairs"], "val": metrics["val_pairs"]}

    seen_only = run("score", model, train, tmp_path / "train-scored.parquet", "--json")
    report = json.loads(seen_only.stdout)
    assert report["seen"]["unseen"] == 0 and report["unseen_accuracy"] is None
    human = run("score", model, train, tmp_path / "again.parquet")
    text = " ".join(human.stdout.split())  # rich wraps long lines off a terminal
    assert "every row was seen by the model" in text and "no held-out figure" in text

    everything = tmp_path / "all-scored.parquet"
    report = json.loads(run("score", model, pairs_path, everything, "--json").stdout)
    test_rows = pl.read_parquet(test).height
    assert report["seen"] == {"train": metrics["train_pairs"], "val": metrics["val_pairs"], "unseen": test_rows}
    scored = pl.read_parquet(everything)
    unseen = scored.filter(~pl.col("in_training") & ~pl.col("in_validation"))
    assert sorted(unseen["pair_id"].to_list()) == sorted(pl.read_parquet(test)["pair_id"].to_list())
    assert report["unseen_accuracy"] == pytest.approx(agreement_summary(unseen)["accuracy"])

    checked = run("rank-check", everything, "--group-by", "in_training", "--json", "--bootstrap", "0")
    splits = json.loads(checked.stdout)["splits"]["in_training"]
    assert {key for key in splits} == {"true", "false"} or {key for key in splits} == {"True", "False"}


def test_agreement_summary_by_hand():
    frame = pl.DataFrame({
        "chosen_reward": [2.0, 1.0, 0.0, 5.0], "rejected_reward": [1.0, 1.0, 1.0, 0.0],
        "in_training": [True, True, False, False], "in_validation": [False, False, False, False],
        "flipped": [False, False, False, True],
    })
    summary = agreement_summary(frame)
    # margins 1, 0, -1, 5: right, tie (1/2), wrong, right -> 2.5 / 4; unseen rows 3 and 4 -> 1 / 2
    assert summary["accuracy"] == 0.625 and summary["unseen_accuracy"] == 0.5
    # clean labels: row 4 was flipped, so its positive margin is wrong against them -> 1.5 / 4, unseen 0 / 2
    assert summary["clean_accuracy"] == 0.375 and summary["unseen_clean_accuracy"] == 0.0
    assert summary["seen"] == {"train": 2, "val": 0, "unseen": 2}
