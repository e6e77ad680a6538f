"""Issue "Inputs": dotted paths into struct columns, and true scores mapped from them into
chosen_score/rejected_score (UltraFeedback keeps GPT-4's scores in a ``metadata`` struct)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import polars as pl
import pytest

from prefnoise.data import ColumnMap, open_source, read_history, resolve_path
from prefnoise.errors import PrefnoiseError
from prefnoise.noise import NoiseSpec
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import REAL_HH

UF_TRL = REAL_HH.parent / "ultrafeedback-binarized-trl-train1000.jsonl.gz"
SCORES = ["--chosen-score-col", "metadata.score_chosen", "--rejected-score-col", "metadata.score_rejected"]


@pytest.fixture
def uf_path():
    if not UF_TRL.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    return UF_TRL


def _raw(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _nested_table(path):
    """Four pairs whose text and scores live in structs, with predicted rewards at the top level."""
    frame = pl.DataFrame(
        {
            "item": [
                {"question": f"q{i}", "good": f"good {i}", "bad": f"bad {i}", "source": "s"} for i in range(4)
            ],
            "metadata": [
                {"score_chosen": c, "score_rejected": r, "model": "m"}
                for c, r in [(9.0, 1.0), (5.0, 4.0), (3.0, 6.0), (7.0, 7.0)]
            ],
            "chosen_reward": [1.0, 0.2, 0.5, 0.1],
            "rejected_reward": [0.0, 0.4, 0.1, 0.3],
        }
    )
    frame.write_parquet(path)
    return path


# --------------------------------------------------------------------------- paths


def test_resolve_path_walks_structs_and_prefers_a_dotted_column_name():
    schema = pl.Schema({"a.b": pl.Int64, "a": pl.Struct({"b": pl.String, "c": pl.Struct({"d": pl.Float64})})})
    assert resolve_path(schema, "a.b", what="test") == ["a.b"]  # the column literally named a.b wins
    assert resolve_path(schema, "a.c.d", what="test") == ["a", "c", "d"]
    expected = r"struct 'a.c' has no field 'e' \(path 'a.c.e', test\); fields of 'a.c' are: d"
    with pytest.raises(PrefnoiseError, match=expected):
        resolve_path(schema, "a.c.e", what="test")
    with pytest.raises(PrefnoiseError, match=r"'a.b.x' is of type String, not a struct, so it has no field 'y'"):
        resolve_path({"a": pl.Struct({"b": pl.Struct({"x": pl.String})})}, "a.b.x.y", what="test")
    with pytest.raises(PrefnoiseError, match=r"no column 'z' \(path 'z.q', test\); columns are: a.b, a"):
        resolve_path(schema, "z.q", what="test")


def test_dotted_text_columns_move_out_of_their_struct(tmp_path):
    path = _nested_table(tmp_path / "nested.parquet")
    columns = ColumnMap(prompt="item.question", chosen="item.good", rejected="item.bad")
    table = open_source(path, columns=columns).collect()
    assert table["prompt"].to_list() == ["q0", "q1", "q2", "q3"]
    assert table["chosen"].to_list()[1] == "good 1" and table["rejected"].to_list()[2] == "bad 2"
    # the mapped fields left the struct; the rest of it stays
    assert table.schema["item"] == pl.Struct({"source": pl.String})


def test_score_columns_map_struct_fields_and_the_struct_keeps_its_other_fields(tmp_path):
    path = _nested_table(tmp_path / "nested.parquet")
    columns = ColumnMap(
        prompt="item.question",
        chosen="item.good",
        rejected="item.bad",
        chosen_score="metadata.score_chosen",
        rejected_score="metadata.score_rejected",
    )
    table = open_source(path, columns=columns).collect()
    assert table["chosen_score"].to_list() == [9.0, 5.0, 3.0, 7.0]
    assert table["rejected_score"].to_list() == [1.0, 4.0, 6.0, 7.0]
    # a score pair named after its responses stays in its struct (it swaps with them on a flip)
    assert table.schema["metadata"] == pl.Struct(
        {"score_chosen": pl.Float64, "score_rejected": pl.Float64, "model": pl.String}
    )
    assert table["metadata"].struct.field("score_chosen").to_list() == [9.0, 5.0, 3.0, 7.0]
    assert table["metadata"].struct.field("score_rejected").to_list() == [1.0, 4.0, 6.0, 7.0]


@pytest.mark.parametrize(
    ("columns", "fragments"),
    [
        (ColumnMap(prompt="item.questoin"), ["struct 'item' has no field 'questoin'", "--prompt-col", "question"]),
        (ColumnMap(chosen="chosen_reward.x"), ["'chosen_reward' is of type Float64, not a struct", "--chosen-col"]),
        (ColumnMap(rejected="nope.bad"), ["no column 'nope'", "--rejected-col", "columns are: item, metadata"]),
        (
            ColumnMap(prompt="item.question", chosen="item.good", rejected="item.bad", chosen_score="item.source",
                      rejected_score="metadata.score_rejected"),
            ["--chosen-score-col item.source: has type String; true scores must be numbers"],
        ),
        (ColumnMap(chosen_score="metadata.score_chosen"), ["--chosen-score-col needs its partner"]),
    ],
)
def test_bad_paths_fail_in_one_line_naming_the_option(tmp_path, columns, fragments):
    path = _nested_table(tmp_path / "nested.parquet")
    with pytest.raises(PrefnoiseError) as caught:
        open_source(path, columns=columns).collect()
    message = caught.value.message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_score_column_is_never_silently_replaced(tmp_path):
    path = tmp_path / "both.parquet"
    pl.DataFrame(
        {"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "chosen_score": [1.0], "rejected_score": [0.0],
         "m": [{"c": 5.0, "r": 2.0}]}
    ).write_parquet(path)
    with pytest.raises(PrefnoiseError, match="column 'chosen_score' exists already and --chosen-score-col m.c"):
        open_source(path, columns=ColumnMap(chosen_score="m.c", rejected_score="m.r")).collect()


# --------------------------------------------------------------------------- UltraFeedback through the CLI


def test_ultrafeedback_bt_noise_flips_by_score_gap(tmp_path, uf_path):
    out = tmp_path / "bt.parquet"
    result = invoke("corrupt", uf_path, out, "--noise", "bt", *SCORES, "--drop-invalid", "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    raw = {(r["prompt"], r["chosen"], r["rejected"]): r["metadata"] for r in _raw(uf_path)}
    table = pl.read_parquet(out)
    assert table.height == summary["rows"] == 994  # 6 invalid rows dropped (README quirks)
    # the user's struct stays (TRL's names), its scores swapped with their responses like the copies
    assert table.schema["metadata"] == pl.Struct({"score_chosen": pl.Float64, "score_rejected": pl.Float64})
    kept = table["metadata"].struct.unnest()
    assert kept["score_chosen"].to_list() == table["chosen_score"].to_list()
    assert kept["score_rejected"].to_list() == table["rejected_score"].to_list()
    assert read_history(out)[-1]["input"]["columns"] == {
        "chosen_score": "metadata.score_chosen",
        "rejected_score": "metadata.score_rejected",
    }
    gaps, flipped = [], table["flipped"].to_numpy()
    for row, flip in zip(table.iter_rows(named=True), flipped):
        first, second = (row["rejected"], row["chosen"]) if flip else (row["chosen"], row["rejected"])
        meta = raw[(row["prompt"], first, second)]
        scores = (meta["score_chosen"], meta["score_rejected"])
        # each score still describes its own response after a flip
        assert (row["chosen_score"], row["rejected_score"]) == (scores[::-1] if flip else scores)
        gaps.append(meta["score_chosen"] - meta["score_rejected"])
    gaps = np.array(gaps)
    # expected rate: mean of sigma(-(s_c - s_r)/T) with T = 1 over the original gaps
    expected = float(np.mean(1 / (1 + np.exp(gaps))))
    assert math.isclose(summary["groups"]["all"]["expected_rate"], expected, rel_tol=1e-12)
    ties, wide = gaps == 0, gaps >= 4
    assert ties.sum() == 110 and wide.sum() == 172
    assert 0.35 < flipped[ties].mean() < 0.65  # a tie flips with probability 1/2 (3 sd: 0.36-0.64)
    assert flipped[wide].sum() <= 8  # a gap of 4+ points flips with probability <= 0.018: ~3 of 172


def test_ultrafeedback_compare_score_uses_the_mapped_scores(tmp_path, uf_path):
    out = tmp_path / "cmp.parquet"
    args = ["--noise", "asymmetric", "--by", "compare:score", "--rate-pos", "0.3", "--rate-neg", "0.1"]
    result = invoke("corrupt", uf_path, out, *args, *SCORES, "--drop-invalid", "--json")
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["groups"]
    # positive pairs: chosen's GPT-4 score is higher; the 110 kept ties (and no inversions) are the rest
    assert groups["positive"]["rows"] == 994 - 110 and groups["negative"]["rows"] == 110


def test_compare_without_mapped_scores_says_how_to_map_them(tmp_path, uf_path):
    out = tmp_path / "cmp.parquet"
    args = ["--noise", "asymmetric", "--by", "compare:score", "--rate-pos", "0.3", "--rate-neg", "0.1"]
    result = invoke("corrupt", uf_path, out, *args, "--drop-invalid")
    needs = "--by compare:score needs columns chosen_score and rejected_score"
    assert_one_line_error(result, needs, "--chosen-score-col")
    assert_nothing_written(out)


def test_by_column_checks_types_and_reads_dotted_paths(tmp_path):
    path = tmp_path / "flags.parquet"
    pl.DataFrame(
        {
            "prompt": [f"p{i}" for i in range(6)],
            "chosen": [f"a{i}" for i in range(6)],
            "rejected": [f"b{i}" for i in range(6)],
            "meta": [{"gpt4": i % 2 == 0, "name": "x"} for i in range(6)],
            "model": ["gpt-4"] * 6,
        }
    ).write_parquet(path)
    base = ["--noise", "asymmetric", "--rate-pos", "1", "--rate-neg", "0", "--force", "--json"]
    result = invoke("corrupt", path, tmp_path / "o.parquet", *base, "--by", "column:meta.gpt4")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(tmp_path / "o.parquet")["flipped"].to_list() == [True, False] * 3
    bad = invoke("corrupt", path, tmp_path / "o2.parquet", *base, "--by", "column:model")
    assert_one_line_error(bad, "--by column:model needs a boolean column", "has type String")
    struct = invoke("corrupt", path, tmp_path / "o3.parquet", *base, "--by", "column:meta")
    assert_one_line_error(struct, "needs a boolean column", "give its dotted path, e.g. column:meta.gpt4")
    text = invoke("corrupt", path, tmp_path / "o4.parquet", *base, "--by", "column:meta.name")
    assert_one_line_error(text, "--by column:meta.name needs a boolean column", "has type String")


def test_compare_needs_numbers(tmp_path):
    path = tmp_path / "text_scores.parquet"
    pl.DataFrame(
        {"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "chosen_grade": ["A"], "rejected_grade": ["B"]}
    ).write_parquet(path)
    spec = NoiseSpec(kind="asymmetric", rate_pos=0.2, rate_neg=0.1, by="compare:grade")
    with pytest.raises(PrefnoiseError, match="needs numeric chosen_grade and rejected_grade .* has type String"):
        spec.check(open_source(path).schema)


def test_rank_check_reads_true_scores_from_struct_fields(tmp_path):
    path = tmp_path / "flat_text.parquet"
    frame = pl.read_parquet(_nested_table(tmp_path / "nested.parquet"))
    frame.with_columns(
        prompt=pl.col("item").struct.field("question"),
        chosen=pl.col("item").struct.field("good"),
        rejected=pl.col("item").struct.field("bad"),
    ).drop("item").write_parquet(path)
    result = invoke(
        "rank-check", path, "--chosen-score-col", "metadata.score_chosen", "--rejected-score-col",
        "metadata.score_rejected", "--json", "--bootstrap", "0",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["true"] == "score"
    # true margins +8, +1, -3, 0 (a tie: left out); predicted +1, -0.2, +0.4 -> only pair 1 agrees
    assert report["overall"]["agreement"]["value"] == pytest.approx(1 / 3)
    assert report["overall"]["agreement"]["true_ties"] == 1
    unmapped = json.loads(invoke("rank-check", path, "--json", "--bootstrap", "0").stdout)
    assert unmapped["true"] is None  # without the mapping the labels are the reference
    assert unmapped["overall"]["agreement"]["value"] == pytest.approx(2 / 4)
