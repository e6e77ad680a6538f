"""Conversational (TRL-format) tables come back out of prefnoise in TRL's format, not flattened."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import prefnoise.cli
from prefnoise import columns as C
from prefnoise.data import read_table, write_table
from prefnoise.noise import swap_responses

ROOT = Path(__file__).resolve().parents[1]
REAL_UF = ROOT.parent / "shared" / "data" / "real" / "ultrafeedback-binarized-trl-train1000.jsonl.gz"


@pytest.fixture
def real_uf_conversational(tmp_path) -> Path:
    """The real UltraFeedback slice in TRL's conversational form (explicit prompt).

    The stored file is trl-lib/ultrafeedback_binarized flattened to plain strings; each row is put
    back into that dataset's message lists (one user turn, one assistant reply per response)."""
    if not REAL_UF.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    path = tmp_path / "uf-conversational.jsonl.gz"
    with gzip.open(REAL_UF, "rt", encoding="utf-8") as src, gzip.open(path, "wt", encoding="utf-8") as out:
        for line in src:
            row = json.loads(line)
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _is_message_list(dtype: pl.DataType) -> bool:
    return dtype == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(C.PAIR_ID)


def test_corrupt_writes_the_real_conversational_file_back_in_trl_format(real_uf_conversational, tmp_path):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        prefnoise.cli.app, ["corrupt", str(real_uf_conversational), str(out), "--rate", "0.3", "--drop-invalid"]
    )
    assert result.exit_code == 0, result.output

    written = pl.read_parquet(out)
    for column in C.REQUIRED:
        assert _is_message_list(written.schema[column]), (column, written.schema[column])
    for helper in (C.PROMPT_MESSAGES, C.chosen(C.MESSAGES), C.rejected(C.MESSAGES)):
        assert helper not in written.columns

    raw = pl.read_ndjson(real_uf_conversational)
    canonical = read_table(real_uf_conversational, drop_invalid=True)
    assert 0 < written.height == canonical.height < raw.height  # the invalid rows were dropped
    raw = raw.join(canonical.select(C.PAIR_ID, "source_index"), on="source_index")
    joined = written.join(raw, on=C.PAIR_ID, suffix="_in")
    assert joined.height == written.height
    flipped = joined.filter(C.FLIPPED)
    kept = joined.filter(~pl.col(C.FLIPPED))
    assert 0 < flipped.height < joined.height
    assert kept["prompt"].to_list() == kept["prompt_in"].to_list()
    assert kept["chosen"].to_list() == kept["chosen_in"].to_list()
    assert kept["rejected"].to_list() == kept["rejected_in"].to_list()
    assert flipped["prompt"].to_list() == flipped["prompt_in"].to_list()
    assert flipped["chosen"].to_list() == flipped["rejected_in"].to_list()
    assert flipped["rejected"].to_list() == flipped["chosen_in"].to_list()

    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_parquet(str(out))
    row = dataset[0]
    for column in C.REQUIRED:
        assert isinstance(row[column], list) and row[column]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row[column])
    assert row["prompt"][0]["role"] == "user" and row["chosen"][-1]["role"] == "assistant"

    back = read_table(out)
    mask = canonical.join(written.select(C.PAIR_ID, C.FLIPPED), on=C.PAIR_ID, how="left")[C.FLIPPED]
    expected = swap_responses(canonical, mask.to_numpy())
    assert_frame_equal(_sorted(back.select(expected.columns)), _sorted(expected))
    assert sorted(back.columns) == sorted(expected.columns)


def test_implicit_prompt_table_round_trips(tmp_path):
    def turn(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    rows = [
        {
            "chosen": [turn("user", "Hi?"), turn("assistant", "Hello!")],
            "rejected": [turn("user", "Hi?"), turn("assistant", "Go away.")],
            "topic": "greeting",
        },
        {
            "chosen": [
                turn("system", "Be brief."),
                turn("user", "2+2?"),
                turn("assistant", "5?"),
                turn("user", "Sure?"),
                turn("assistant", "4, sorry."),
            ],
            "rejected": [
                turn("system", "Be brief."),
                turn("user", "2+2?"),
                turn("assistant", "5?"),
                turn("user", "Sure?"),
                turn("assistant", "Yes, 5. Ünïcode ✓"),
            ],
            "topic": "math",
        },
    ]
    source = tmp_path / "implicit.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    canonical = read_table(source)
    assert canonical["chosen"].to_list() == ["Hello!", "4, sorry."]
    assert json.loads(canonical[C.chosen(C.MESSAGES)][1]) == [turn("assistant", "4, sorry.")]

    out = tmp_path / "out.parquet"
    write_table(canonical, out)
    written = pl.read_parquet(out)
    assert written.columns == [C.PAIR_ID, *C.REQUIRED, "topic"]
    assert written["prompt"].to_list() == [r["chosen"][:-1] for r in rows]
    assert written["chosen"].to_list() == [r["chosen"][-1:] for r in rows]
    assert written["rejected"].to_list() == [r["rejected"][-1:] for r in rows]
    assert_frame_equal(read_table(out), canonical)

    # flipping a label swaps the messages with their response
    flipped = swap_responses(canonical, [False, True])
    write_table(flipped, tmp_path / "flipped.parquet")
    again = pl.read_parquet(tmp_path / "flipped.parquet")
    assert again["chosen"][1].to_list() == [turn("assistant", "Yes, 5. Ünïcode ✓")]
    assert again["rejected"][1].to_list() == [turn("assistant", "4, sorry.")]
    back = read_table(tmp_path / "flipped.parquet")
    assert_frame_equal(back.select(flipped.columns), flipped)  # the helper columns come back last
