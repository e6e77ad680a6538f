"""TRL's true-score columns (``score_chosen``/``score_rejected``, as trl-lib/ultrafeedback_binarized has
them): recognised at the top level, hinted when nested, and kept under the user's names in outputs."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from prefnoise.data import ColumnMap, open_source, read_table, recognise_scores, score_candidates, score_hint
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import REAL_HH

UF_EVAL = REAL_HH.parent / "ultrafeedback-binarized-trl-eval200.jsonl.gz"
SCORES = ["--chosen-score-col", "metadata.score_chosen", "--rejected-score-col", "metadata.score_rejected"]
HINT = (
    "true scores may be in metadata.score_chosen/metadata.score_rejected: pass --chosen-score-col "
    "metadata.score_chosen --rejected-score-col metadata.score_rejected"
)


def _trl_flat(path, n=40):
    """``n`` pairs in trl-lib/ultrafeedback_binarized's flat layout: scores at the top level."""
    pl.DataFrame(
        {
            "prompt": [f"p{i}" for i in range(n)],
            "chosen": [f"good {i}" for i in range(n)],
            "rejected": [f"bad {i}" for i in range(n)],
            "score_chosen": [float(i % 10) + 1 for i in range(n)],
            "score_rejected": [float(i % 10) for i in range(n)],
        }
    ).write_parquet(path)
    return path


def test_top_level_trl_scores_are_the_true_scores_and_keep_their_names(tmp_path):
    source = _trl_flat(tmp_path / "trl.parquet")
    table = read_table(source)
    assert table["chosen_score"].to_list() == [float(i % 10) + 1 for i in range(40)]
    assert table["rejected_score"].to_list() == [float(i % 10) for i in range(40)]
    assert table.columns[:7] == ["pair_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                                 "chosen_score"]
    out = tmp_path / "flipped.parquet"
    done = invoke("corrupt", source, out, "--rate", "0.25", "--seed", "1", "--json")
    assert done.exit_code == 0, done.output
    written = pl.read_parquet(out)
    flipped = written["flipped"].to_list()
    assert sum(flipped) == 10
    for row, flip in zip(written.iter_rows(named=True), flipped):
        i = int(row["prompt"][1:])
        good, bad = float(i % 10) + 1, float(i % 10)
        # TRL's own columns travel with their response on a flip, like the canonical copies
        assert (row["score_chosen"], row["score_rejected"]) == ((bad, good) if flip else (good, bad))
        assert (row["chosen_score"], row["rejected_score"]) == (row["score_chosen"], row["score_rejected"])
        assert row["chosen"] == (f"bad {i}" if flip else f"good {i}")


def test_bt_noise_uses_trl_scores_without_flags(tmp_path):
    source = _trl_flat(tmp_path / "trl.parquet")
    done = invoke("corrupt", source, tmp_path / "bt.parquet", "--noise", "bt", "--json")
    assert done.exit_code == 0, done.output
    # gap 1 on every pair: sigma(-1) = 0.26894...
    assert json.loads(done.stdout)["groups"]["all"]["expected_rate"] == pytest.approx(0.2689414213699951)


def test_recognition_never_overrides_the_users_own_choice():
    schema = {"score_chosen": pl.Float64, "score_rejected": pl.Float64}
    assert recognise_scores(ColumnMap(), schema) == ColumnMap(chosen_score="score_chosen",
                                                               rejected_score="score_rejected")
    given = ColumnMap(chosen_score="a", rejected_score="b")
    assert recognise_scores(given, schema) == given
    assert recognise_scores(ColumnMap(), {**schema, "chosen_score": pl.Float64}) == ColumnMap()
    assert recognise_scores(ColumnMap(), {"score_chosen": pl.String, "score_rejected": pl.String}) == ColumnMap()


def test_score_candidates_and_hint_name_nested_pairs():
    schema = {
        "metadata": pl.Struct({"model_chosen": pl.String, "model_rejected": pl.String,
                               "inner": pl.Struct({"rating_chosen": pl.Int64, "rating_rejected": pl.Float64})}),
        "chosen_reward": pl.Float64,
        "rejected_reward": pl.Float64,
        "chosen_score": pl.Float64,
        "rejected_score": pl.Float64,
    }
    assert score_candidates(schema) == [("metadata.inner.rating_chosen", "metadata.inner.rating_rejected")]
    assert score_hint({"a": pl.Float64}) == ""


def test_mapped_nested_scores_stay_in_place_and_rerun_with_the_same_flags(tmp_path):
    source = tmp_path / "nested.parquet"
    pl.DataFrame(
        {
            "prompt": ["p0", "p1", "p2"],
            "chosen": ["a0", "a1", "a2"],
            "rejected": ["b0", "b1", "b2"],
            "metadata": [{"score_chosen": 9.0, "score_rejected": 2.0}, {"score_chosen": 5.0, "score_rejected": 4.0},
                         {"score_chosen": 3.0, "score_rejected": 1.0}],
        }
    ).write_parquet(source)
    first = tmp_path / "first.jsonl"
    done = invoke("corrupt", source, first, "--rate", "1", "--force", *SCORES)
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert [r["metadata"] for r in rows] == [
        {"score_chosen": 2.0, "score_rejected": 9.0},
        {"score_chosen": 4.0, "score_rejected": 5.0},
        {"score_chosen": 1.0, "score_rejected": 3.0},
    ]
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(2.0, 9.0), (4.0, 5.0), (1.0, 3.0)]
    # the output read again with the same flags: prefnoise's own copies are recognised, not a conflict
    again = open_source(first, columns=ColumnMap(chosen_score="metadata.score_chosen",
                                                 rejected_score="metadata.score_rejected")).collect()
    assert again["chosen_score"].to_list() == [2.0, 4.0, 1.0]
    assert again.columns.count("chosen_score") == 1


def test_a_differing_score_column_is_still_refused(tmp_path):
    source = tmp_path / "both.parquet"
    pl.DataFrame(
        {"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "chosen_score": [1.0], "rejected_score": [0.0],
         "m": [{"score_chosen": 5.0, "score_rejected": 2.0}]}
    ).write_parquet(source)
    columns = ColumnMap(chosen_score="m.score_chosen", rejected_score="m.score_rejected")
    with pytest.raises(ValueError, match="column 'chosen_score' exists already and --chosen-score-col m.score_chosen"):
        open_source(source, columns=columns).collect()


@pytest.fixture
def uf_eval():
    if not UF_EVAL.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    return UF_EVAL


def test_real_trl_file_keeps_metadata_and_hints_its_scores(tmp_path, uf_eval):
    with gzip.open(uf_eval, "rt", encoding="utf-8") as handle:
        raw = {(r["prompt"], r["chosen"], r["rejected"]): r["metadata"] for r in map(json.loads, handle)}
    out = tmp_path / "bt.jsonl"
    missing = invoke("corrupt", uf_eval, out, "--noise", "bt", "--drop-invalid")
    assert_one_line_error(missing, "--noise bt needs true scores", HINT)
    assert_nothing_written(out)
    done = invoke("corrupt", uf_eval, out, "--noise", "bt", "--drop-invalid", "--seed", "2", *SCORES)
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 199 and 0 < sum(r["flipped"] for r in rows) < 199
    for row in rows:
        first, second = (row["rejected"], row["chosen"]) if row["flipped"] else (row["chosen"], row["rejected"])
        meta = raw[(row["prompt"], first, second)]
        expected = [meta["score_rejected"], meta["score_chosen"]] if row["flipped"] else list(meta.values())
        assert [row["metadata"]["score_chosen"], row["metadata"]["score_rejected"]] == expected
        assert [row["chosen_score"], row["rejected_score"]] == expected


def test_rank_check_note_hints_nested_scores(tmp_path):
    source = tmp_path / "pred.parquet"
    pl.DataFrame(
        {"prompt": ["p0", "p1"], "chosen": ["a", "c"], "rejected": ["b", "d"], "chosen_reward": [1.0, 0.0],
         "rejected_reward": [0.0, 1.0], "metadata": [{"score_chosen": 2.0, "score_rejected": 1.0}] * 2}
    ).write_parquet(source)
    report = json.loads(invoke("rank-check", source, "--json", "--bootstrap", "0").stdout)
    assert report["true"] is None
    assert report["note"] == f"no chosen_score/rejected_score columns: the labels are the reference; {HINT}"
