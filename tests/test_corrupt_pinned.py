"""corrupt's output pinned to the byte on a real file: speed work on the corrupt path (pair_id
derivation, reading, writing) must not change a single value, column type or row order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from cli_helpers import invoke

from prefnoise.data import content_pair_ids
from prefnoise.data.canonical import content_pair_id_column
from prefnoise.data.provenance import METADATA_KEY

NAME = "ultrafeedback-binarized-trl-eval200.jsonl.gz"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / NAME
if not REAL.exists():  # a worktree is not beside shared/
    REAL = Path("/work/shared/data/real") / NAME

pytestmark = pytest.mark.skipif(not REAL.exists(), reason="the shared real-data file is not here")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_digest(path: Path) -> tuple[str, str, int]:
    """(Arrow schema without metadata, sha256 of the rows as JSON lines, row groups) of a Parquet file."""
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow.remove_metadata().to_string()
    return schema, _sha(pl.read_parquet(path).write_ndjson().encode()), parquet.num_row_groups


def test_derived_pair_ids_and_flips_are_pinned(tmp_path):
    out_jsonl, out_parquet = tmp_path / "uf.jsonl", tmp_path / "uf.parquet"
    for out in (out_jsonl, out_parquet):
        result = invoke("corrupt", REAL, out, "--rate", "0.3", "--seed", "7", "--drop-invalid")
        assert result.exit_code == 0, result.output
    assert _sha(out_jsonl.read_bytes()) == "de5980839cf22220291f890f9170ade67273c2ee0eed95d7d0970ce88e2d890b"
    schema, rows, groups = _parquet_digest(out_parquet)
    assert (rows, groups) == ("de5980839cf22220291f890f9170ade67273c2ee0eed95d7d0970ce88e2d890b", 1)
    assert schema.splitlines() == [
        *(f"{name}: large_string" for name in ("pair_id", "prompt", "chosen", "rejected")),
        "source_index: int64",
        "metadata: struct<score_chosen: double, score_rejected: double>",
        "  child 0, score_chosen: double",
        "  child 1, score_rejected: double",
        "flipped: bool",
    ]
    history = json.loads(pq.read_metadata(out_parquet).metadata[METADATA_KEY])["history"]
    assert [entry["command"] for entry in history] == ["corrupt"]


def test_given_pair_ids_asymmetric_flips_are_pinned(tmp_path):
    source = tmp_path / "uf-ids.parquet"
    frame = pl.read_ndjson(REAL)
    frame.with_columns(pl.format("uf-{}", pl.int_range(pl.len())).alias("pair_id")).write_parquet(source)
    out = tmp_path / "uf-ids-noisy.parquet"
    result = invoke("corrupt", source, out, "--noise", "asymmetric", "--rate-pos", "0.4", "--rate-neg", "0.1",
                    "--seed", "3", "--drop-invalid")
    assert result.exit_code == 0, result.output
    schema, rows, groups = _parquet_digest(out)
    assert (rows, groups) == ("3a9c2e04bc7fb559dc167e36c334a5b86384ae68fb1ff75c1b9ea7280b6563d1", 1)


def test_content_id_column_equals_the_per_row_ids():
    texts = ["", " ", "a", "ab", "é中🙂", "x\x00y", "p" * 2047, "q" * 2048, "r" * 5000]
    prompts = pl.Series([texts[i % len(texts)] for i in range(40)] + [None])
    chosens = pl.Series([texts[(i * 3 + 1) % len(texts)] for i in range(40)] + ["c"])
    rejecteds = pl.Series([texts[(i * 7 + 2) % len(texts)] for i in range(40)] + [None])
    for start, length in ((0, 41), (5, 20), (40, 1), (3, 0)):
        p, c, r = (s.slice(start, length) for s in (prompts, chosens, rejecteds))
        ids = content_pair_id_column(p, c, r)
        assert (ids.name, ids.dtype) == ("pair_id", pl.String)
        assert ids.to_list() == content_pair_ids(p.fill_null(""), c.fill_null(""), r.fill_null(""))
    one = content_pair_id_column(pl.Series(["p"]), pl.Series(["c"]), pl.Series(["r"]))
    assert one.to_list() == ["f8450577b67a39a8"]
