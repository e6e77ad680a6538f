"""`prefnoise reproduce alignment --quick`: files, every cell, a valid figure, and the paper's direction."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.experiments import alignment as A
from prefnoise.experiments.tiny_lm import BAD_WORDS, GOOD_WORDS, quality_pairs

runner = CliRunner()


def test_quality_pairs_prefer_more_good_words():
    frame = quality_pairs(300, seed=2, response_words=8, max_gap=2)

    def quality(text: str) -> int:
        words = text.split()
        return sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words)
    gaps = [quality(c) - quality(r) for c, r in zip(frame["chosen"], frame["rejected"], strict=True)]
    # quality = good − bad over the 4 graded words; chosen is better by 1..2 good words = 2 or 4 points
    assert set(gaps) == {2, 4}
    assert (frame["chosen_score"] - frame["rejected_score"]).to_list() == [float(g) for g in gaps]
    assert all(len(t.split()) == 8 for t in frame["chosen"]) and frame["pair_id"].n_unique() == 300
    assert 0.4 < frame["first_better"].mean() < 0.6
    assert quality_pairs(300, seed=2).equals(frame)  # a pure function of the seed


def test_loss_options_give_rdpo_the_rate_and_cdpo_at_least_a_tenth():
    assert A.loss_options("rdpo", 0.4) == {"loss": "rdpo", "noise_rate": 0.4}
    assert A.loss_options("cdpo", 0.0) == {"loss": "cdpo", "label_smoothing": 0.1}
    assert A.loss_options("sympo-ramp", 0.2) == {"loss": "sympo", "symmetric_loss": "ramp"}
    settings = A.AlignmentConfig().settings()
    assert [(k, r) for k, r, _ in settings] == [("symmetric", 0.0), ("symmetric", 0.2), ("symmetric", 0.4),
                                                ("asymmetric", 0.2)]
    assert A.AlignmentConfig().cells() == 4 * 6 * 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "alignment"
    result = runner.invoke(app, ["reproduce", "alignment", "--out", str(out), "--quick", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.xdist_group("reproduce-alignment")  # one worker builds the module's quick run once
def test_quick_alignment_writes_every_cell_and_a_figure(quick_run):
    out, payload = quick_run
    config = A.AlignmentConfig.quick()
    results = pl.read_parquet(out / "results.parquet")
    cells = {(k, r, loss, s) for k, r, loss, s in results.select("kind", "rate", "loss", "seed").iter_rows()}
    expected = {(k, r, loss, s) for k, r, _ in config.settings() for loss in config.losses for s in range(config.seeds)}
    assert cells == expected and results.height == config.cells() == payload["cells"]
    assert results["clean_accuracy"].is_between(0, 1).all()
    # the flip rate a run saw is the corrupt step's, close to the nominal rate on 400 pairs
    noisy = results.filter(pl.col("rate") == 0.4)["train_flip_rate"]
    assert ((noisy - 0.4).abs() < 0.08).all()
    table = (out / "results.md").read_text()
    for loss in config.losses:
        assert loss in table
    assert "sym 0.4" in table
    png = (out / "robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.xdist_group("reproduce-alignment")  # one worker builds the module's quick run once
def test_quick_alignment_learns_clean_and_sympo_holds_up_at_the_highest_rate(quick_run):
    out, payload = quick_run
    results = pl.read_parquet(out / "results.parquet")
    clean = results.filter(pl.col("rate") == 0.0)
    assert clean["clean_accuracy"].min() > 0.85  # the task is learned without noise
    top = payload["highest_rate"]
    sympo = A.mean_accuracy_at(results, top, A.SYMMETRIC_LOSSES)
    dpo = A.mean_accuracy_at(results, top, ["dpo"])
    assert sympo >= dpo, (sympo, dpo)  # the paper's direction: SymPO is not hurt more than DPO
    assert payload["mean_clean_accuracy_at_highest_rate"]["dpo"] == pytest.approx(dpo)
