"""JSON lines whose column mixes strings with other values: read as polars reads them (PandaLM's responses
include a bare ``true``), or refused in one line when Arrow meets the mix too late."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pyarrow.json as pa_json
import pytest

from prefnoise.data import ColumnMap, open_source
from prefnoise.data.json_lines import json_lines_batches
from prefnoise.data.nesting import MAX_NESTING
from prefnoise.errors import PrefnoiseError, PrefnoiseWarning
from tests.cli_helpers import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]
PANDALM = next(
    (p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if (p / "data" / "real").is_dir()),
    ROOT.parent / "shared",
) / "data" / "real" / "pandalm-dev.jsonl.gz"
PANDALM_COLUMNS = ColumnMap(prompt="instruction", chosen="response1", rejected="response2")


def _lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _pair(i: int, chosen: object = "c") -> dict:
    return {"prompt": f"p{i}", "chosen": chosen, "rejected": f"r{i}"}


@pytest.mark.skipif(not PANDALM.exists(), reason="the shared real-data file is not here")
def test_the_real_pandalm_slice_reads_with_its_boolean_responses_as_text():
    source = open_source(PANDALM, columns=PANDALM_COLUMNS, drop_invalid=True)  # two rows have an empty response
    with pytest.warns(PrefnoiseWarning, match=r"column 'response1' mixes string and boolean"):
        table = source.collect()
    upstream = {row["idx"]: row for row in map(json.loads, gzip.open(PANDALM, "rt"))}
    assert source.rows_read == len(upstream) == 390
    by_idx = {row["idx"]: row for row in table.iter_rows(named=True)}
    line_79, line_83 = list(upstream.values())[78], list(upstream.values())[82]
    assert (line_79["response1"], line_79["response2"]) == (True, "True.")
    assert (by_idx[line_79["idx"]]["chosen"], by_idx[line_79["idx"]]["rejected"]) == ("true", "True.")
    assert (line_83["response2"], by_idx[line_83["idx"]]["rejected"]) == (True, "true")  # response2 mixes too
    assert all(row["annotator1"] == upstream[idx]["annotator1"] for idx, row in by_idx.items())


@pytest.mark.skipif(not PANDALM.exists(), reason="the shared real-data file is not here")
def test_inspect_reads_the_real_pandalm_slice_and_warns_once():
    result = invoke(
        "inspect", PANDALM, "--prompt-col", "instruction", "--chosen-col", "response1", "--rejected-col", "response2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 390
    assert result.stderr.count("Warning:") == 1 and "'response1'" in result.stderr


def test_a_mix_is_read_as_json_text_and_a_second_read_goes_straight_to_polars(tmp_path):
    path = _lines(tmp_path / "mixed.jsonl", [_pair(0), _pair(1, True), _pair(2, 3.5), _pair(3, {"k": [1]}), _pair(4)])
    source = open_source(path)
    with pytest.warns(PrefnoiseWarning, match="'chosen' mixes string and boolean"):
        first = source.collect()
    assert first["chosen"].to_list() == ["c", "true", "3.5", '{"k": [1]}', "c"]  # the text as written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the source remembers the file
        assert source.collect()["chosen"].to_list() == first["chosen"].to_list()


def test_a_mix_past_the_first_block_is_refused_naming_the_column(tmp_path):
    path = _lines(tmp_path / "late.jsonl", [_pair(i) for i in range(50)] + [_pair(50, False)])
    options = pa_json.ReadOptions(block_size=256)  # the first block holds a few rows only
    batches = json_lines_batches(path, "late.jsonl", options, batch_size=100, mixed=set())
    assert next(batches).num_rows > 0
    with pytest.raises(PrefnoiseError, match=r"late.jsonl: column 'chosen' holds boolean values after string ones"):
        list(batches)


def test_the_polars_read_still_refuses_a_line_nested_too_deep(tmp_path):
    deep = "[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5)
    path = tmp_path / "deep.jsonl"
    rows = [json.dumps(_pair(0)), json.dumps(_pair(1, True)), f'{{"prompt": "p", "chosen": {deep}, "rejected": "r"}}']
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(PrefnoiseError, match=r"deep.jsonl: line 3 nests values more than 100 levels deep"):
        json_lines_batches_list(path)


def json_lines_batches_list(path: Path) -> list:
    """Every batch of ``path`` read by json_lines_batches with the reader's own options."""
    options = pa_json.ReadOptions(block_size=32 * 2**20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrefnoiseWarning)
        return list(json_lines_batches(path, path.name, options, batch_size=100, mixed=set()))


def test_the_cli_names_the_file_when_the_polars_read_fails(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_pair(0)) + "\n" + json.dumps(_pair(1, True)) + "\n{not json\n")
    result = invoke("inspect", path)
    assert_one_line_error(result, "bad.jsonl: cannot read as json")
