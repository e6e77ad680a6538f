"""inspect counts rows by one rule in every format: every stored row (issue 20: a saved DatasetDict
showed 99 rows where the same data as Parquet showed 100)."""

from __future__ import annotations

import json

import datasets
import polars as pl
import pytest

from tests.cli_helpers import invoke
from tests.conftest import make_pairs


@pytest.fixture
def sources(tmp_path):
    frame = make_pairs(100)
    frame = frame.with_columns(rejected=frame["rejected"].scatter(7, frame["chosen"][7]))  # one invalid row
    frame.write_parquet(tmp_path / "t.parquet")
    frame.write_ndjson(tmp_path / "t.jsonl")
    datasets.Dataset.from_polars(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(frame)}).save_to_disk(str(tmp_path / "dict"))
    return {
        "parquet": [tmp_path / "t.parquet"],
        "json": [tmp_path / "t.jsonl"],
        "hf-dataset": [tmp_path / "saved"],
        "dict": [tmp_path / "dict", "--split", "train"],
    }


def _report(*args):
    done = invoke("inspect", *args, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_every_format_counts_every_stored_row_and_shows_the_same_columns(sources):
    reports = {kind: _report(*args) for kind, args in sources.items()}
    assert {kind: r["rows"] for kind, r in reports.items()} == dict.fromkeys(sources, 100)
    reference = reports["parquet"]["columns"]
    assert [c["column"] for c in reference] == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    for kind, report in reports.items():
        for column, expected in zip(report["columns"], reference, strict=True):
            assert column.keys() == expected.keys(), kind
            for key, value in expected.items():  # sums may differ in the last bit
                wanted = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
                assert column[key] == wanted, (kind, column["column"], key)
        assert report["invalid_rows"] is None
    assert reports["dict"]["format"] == "hf-dataset"


def test_mapped_columns_describe_the_valid_rows_and_count_the_invalid(sources):
    for kind, args in sources.items():
        report = _report(*args, "--prompt-col", "prompt", "--layout", "auto", "--chosen-col", "chosen",
                         "--rejected-col", "rejected", "--chosen-score-col", "chosen_score",
                         "--rejected-score-col", "rejected_score")
        assert report["rows"] == 100, kind  # score mapping alone keeps the stored view
    renamed = sources["parquet"][0].with_name("q.parquet")
    pl.read_parquet(sources["parquet"][0]).rename({"prompt": "question"}).write_parquet(renamed)
    report = _report(renamed, "--prompt-col", "question")
    assert report["rows"] == 100
    assert report["invalid_rows"] == {"'chosen' equals 'rejected'": 1}
    assert report["columns"][0]["column"] == "pair_id" and report["columns"][0]["nulls"] == 0
    shown = invoke("inspect", renamed, "--prompt-col", "question")
    assert "(parquet, 100 rows; 1 invalid, left out of the statistics)" in shown.stdout
