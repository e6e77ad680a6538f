"""Issue "Inputs": OUT's extension picks the format: .parquet (or none) Parquet with provenance,
.jsonl JSON lines, .csv CSV (flat columns only); anything else is refused."""

from __future__ import annotations

import json
import os
import stat

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from prefnoise import columns as C
from prefnoise.data import output_format, read_history, read_table, write_table
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import make_pairs


@pytest.fixture
def pairs_path(tmp_path):
    path = tmp_path / "in.parquet"
    make_pairs(40).write_parquet(path)
    return path


@pytest.mark.parametrize(
    ("name", "kind"),
    [("o.parquet", "parquet"), ("o.PQ", "parquet"), ("o", "parquet"), ("-", "parquet"), ("o.jsonl", "jsonl"),
     ("o.CSV", "csv")],
)
def test_output_format_follows_the_extension(name, kind):
    assert output_format(name) == kind


@pytest.mark.parametrize("name", ["o.json", "o.tsv", "o.txt", "o.jsonl.gz", "o.parquet.zst"])
def test_other_extensions_are_refused(name):
    with pytest.raises(PrefnoiseError, match=f"unknown table format '{os.path.splitext(name)[1]}'"):
        output_format(name)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_jsonl_and_csv_outputs_hold_the_same_rows_as_parquet(tmp_path, pairs_path, suffix):
    args = ["--rate", "0.3", "--seed", "7"]
    assert invoke("corrupt", pairs_path, tmp_path / "ref.parquet", *args).exit_code == 0
    result = invoke("corrupt", pairs_path, tmp_path / f"out{suffix}", *args)
    assert result.exit_code == 0, result.output
    reference = pl.read_parquet(tmp_path / "ref.parquet")
    text = (tmp_path / f"out{suffix}").read_text(encoding="utf-8")
    if suffix == ".jsonl":
        assert text.count("\n") == 40 and json.loads(text.splitlines()[0])["pair_id"] == reference["pair_id"][0]
    else:
        assert text.splitlines()[0] == ",".join(reference.columns)  # one header, then the rows
    back = read_table(tmp_path / f"out{suffix}")  # prefnoise reads its own output back
    assert_frame_equal(back, reference, check_exact=True)
    assert 0 < int(back[C.FLIPPED].sum()) < 40
    # JSON lines and CSV carry no provenance; inspect says so
    assert read_history(tmp_path / "ref.parquet") and read_history(tmp_path / f"out{suffix}") == []
    shown = invoke("inspect", tmp_path / f"out{suffix}")
    assert "history: none (JSON lines and CSV files carry no provenance" in shown.stdout
    mode = stat.S_IMODE((tmp_path / f"out{suffix}").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # written like a plain open() under the user's umask


def test_csv_refuses_nested_columns_naming_them(tmp_path):
    source = tmp_path / "nested.parquet"
    make_pairs(5).with_columns(meta=pl.struct(a=pl.lit(1), b=pl.lit("x"))).write_parquet(source)
    out = tmp_path / "out.csv"
    assert_one_line_error(
        invoke("corrupt", source, out, "--rate", "0.1"), "column 'meta' holds Struct", "write *.jsonl or *.parquet"
    )
    assert_nothing_written(out)
    assert invoke("corrupt", source, tmp_path / "out.jsonl", "--rate", "0.1").exit_code == 0
    assert read_table(tmp_path / "out.jsonl")["meta"].to_list()[0] == {"a": 1, "b": "x"}


def test_an_existing_jsonl_or_csv_is_never_replaced(tmp_path, pairs_path):
    for name in ("old.jsonl", "old.csv"):
        out = tmp_path / name
        assert invoke("corrupt", pairs_path, out, "--rate", "0.1").exit_code == 0
        before = out.read_bytes()
        line = assert_one_line_error(
            invoke("corrupt", pairs_path, out, "--rate", "0.2", "--overwrite"), "carry no provenance", "never replaces"
        )
        assert "remove it" in line and out.read_bytes() == before


def test_conversational_tables_round_trip_through_jsonl(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(6)
    ]
    source = tmp_path / "conv.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = invoke("corrupt", source, out, "--rate", "0.5", "--force", "--seed", "1")
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [sorted(r) for r in written] == [sorted(["pair_id", "prompt", "chosen", "rejected", "flipped"])] * 6
    for row, original in zip(written, rows):
        assert row["prompt"] == original["prompt"]  # TRL's message lists, not flattened text
        pair = (original["chosen"], original["rejected"])
        assert (row["chosen"], row["rejected"]) == (pair[::-1] if row["flipped"] else pair)
    assert 0 < sum(r["flipped"] for r in written) < 6
    # and reading the JSONL back gives the same canonical table as the original plus the flips
    assert read_table(out)["pair_id"].to_list() == [r["pair_id"] for r in written]


def test_write_table_library_call_writes_jsonl_non_finite_as_null(tmp_path):
    frame = make_pairs(3).with_columns(chosen_score=pl.Series([1.5, float("nan"), float("inf")]))
    assert write_table(frame, tmp_path / "t.jsonl") == 3
    values = [json.loads(line)["chosen_score"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert values == [1.5, None, None]  # JSON has no NaN or infinity (README: output formats)
