"""Hostile bytes on disk give one line and exit 2, never a crash or an invalid output file.

A hostile-input sweep found: invalid UTF-8 in JSONL/CSV was written to an out-of-spec Parquet file
with exit 0 (every later command then crashed; without ``pair_id`` a 260-line polars panic); damaged
Parquet pages crashed ``rank-check`` and ``inspect``; shards with different columns or types crashed;
malformed provenance metadata crashed every command; a saved dataset's state.json, or a shard that is
a symlink, could make prefnoise read files outside the directory. Each case is pinned here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefnoise.data import open_source, read_history, read_provenance, read_table, write_table
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import make_pairs

RATE = ["--rate", "0.2"]








def jsonl_bytes(rows: list[bytes]) -> bytes:
    return b"\n".join(rows) + b"\n"


def invalid_utf8_parquet(path: Path, *, rewards: bool = True) -> Path:
    """A Parquet file (as other tools write them) whose 'chosen' holds invalid UTF-8 in row 2."""
    chosen = pa.array([b"fine", b"o\xffk", b"also fine"], pa.binary()).view(pa.string())
    columns = {"prompt": ["p1", "p1", "p2"], "chosen": chosen, "rejected": ["x", "y", "z"]}
    if rewards:
        columns |= {
            "chosen_reward": [1.0, 2.0, 3.0],
            "rejected_reward": [0.0, 1.0, 2.0],
            "chosen_score": [1.0, 2.0, 3.0],
            "rejected_score": [0.0, 1.0, 2.0],
        }
    pq.write_table(pa.table(columns), path)
    return path


# --- invalid UTF-8 --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_pair_id", [False, True])
def test_invalid_utf8_in_jsonl_names_file_column_and_row(tmp_path, with_pair_id):
    rows = [
        b'{"prompt": "p1", "chosen": "good", "rejected": "bad"}',
        b'{"prompt": "p2", "chosen": "g2", "rejected": "b2"}',
        b'{"prompt": "p3", "chosen": "g\xff\xfe3", "rejected": "b3"}',
    ]
    if with_pair_id:  # with ids the old reader never decoded the text and wrote it out as is
        rows = [row[:-1] + f', "pair_id": "id{i}"}}'.encode() for i, row in enumerate(rows)]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(jsonl_bytes(rows))
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(invoke("corrupt", source, out, *RATE))
    assert line == f"Error: {source}: invalid UTF-8 in column 'chosen' at row 3; re-encode the file as UTF-8"
    assert_nothing_written(out)


def test_invalid_utf8_in_csv_names_the_row(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_bytes(b"prompt,chosen,rejected\np1,good,bad\np2,g2,b2\np3,ok,b\xc3(3\n")
    out = tmp_path / "out.parquet"
    assert_one_line_error(
        invoke("corrupt", source, out, *RATE), f"{source}: invalid UTF-8 in column 'rejected' at row 3;"
    )
    assert_nothing_written(out)


def test_invalid_utf8_nested_in_messages_is_found(tmp_path):
    def message(content: bytes) -> bytes:
        return b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "' + content + b'"}]'

    rows = [
        b'{"chosen": ' + message(b"yes") + b', "rejected": ' + message(b"no") + b"}",
        b'{"chosen": ' + message(b"sure") + b', "rejected": ' + message(b"n\xffo") + b"}",
    ]
    source = tmp_path / "chat.jsonl"
    source.write_bytes(jsonl_bytes(rows))
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("corrupt", source, out, *RATE), "invalid UTF-8 in column 'rejected' at row 2;")
    assert_nothing_written(out)


def test_invalid_utf8_parquet_from_another_tool_in_every_command(tmp_path):
    source = invalid_utf8_parquet(tmp_path / "bad.parquet")
    expected = f"{source}: invalid UTF-8 in column 'chosen' at row 2; re-encode the file as UTF-8"
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("corrupt", source, out, *RATE), expected)
    assert_nothing_written(out)
    assert_one_line_error(invoke("inspect", source), expected)
    # rank-check hashes the response texts when it compares with a true reward
    assert_one_line_error(invoke("rank-check", source, "--bootstrap", "0"), expected)


def test_rows_are_counted_across_batches_and_the_library_raises_before_polars(tmp_path):
    rows = [f'{{"prompt": "p{i}", "chosen": "c{i}", "rejected": "r{i}"}}'.encode() for i in range(1, 12)]
    rows[9] = b'{"prompt": "p10", "chosen": "c10", "rejected": "r\xed\xa0\x80"}'  # an encoded surrogate
    source = tmp_path / "long.jsonl"
    source.write_bytes(jsonl_bytes(rows))
    with pytest.raises(PrefnoiseError, match=r"invalid UTF-8 in column 'rejected' at row 10;"):
        open_source(source, batch_size=4).collect()
    with pytest.raises(PrefnoiseError, match=r"at row 10;"):
        open_source(source).scan_raw().collect()


def test_valid_but_unusual_unicode_passes_unchanged(tmp_path):
    texts = ["emoji 😀👍🏽", "combining é", "rtl שלום", "nul \x00 inside", "zero\u200bwidth", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    frame = pl.DataFrame(
        {"prompt": texts, "chosen": [t + " yes" for t in texts], "rejected": [t + " no" for t in texts]}
    )
    source = tmp_path / "unicode.jsonl"
    frame.write_ndjson(source)
    out = tmp_path / "out.parquet"
    result = invoke("corrupt", source, out, "--rate", "0", "--json")
    assert result.exit_code == 0, result.output
    back = pl.read_parquet(out)
    assert back["prompt"].to_list() == texts and back["chosen"].to_list() == [t + " yes" for t in texts]
    pq.read_table(out).validate(full=True)


# --- damaged Parquet ------------------------------------------------------------------------------


def damage(path: Path, column: str, where: str) -> None:
    """Overwrite bytes of ``column``'s first column chunk: its page header, or the middle of its data."""
    chunks = pq.ParquetFile(path).metadata.row_group(0)
    names = [chunks.column(i).path_in_schema for i in range(chunks.num_columns)]
    chunk = chunks.column(names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    offset = start if where == "header" else start + chunk.total_compressed_size // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 48 if where == "header" else bytes(range(48)))


@pytest.fixture(params=[("header", "zstd"), ("middle", "zstd"), ("middle", "uncompressed")], ids="-".join)
def damaged(request, tmp_path) -> Path:
    where, compression = request.param
    frame = make_pairs(300).with_columns(chosen_reward=pl.col("chosen_score"), rejected_reward=pl.col("rejected_score"))
    path = tmp_path / "damaged.parquet"
    frame.write_parquet(path, compression=compression)
    damage(path, "chosen", where)
    with pytest.raises(Exception):  # noqa: B017 - really damaged: pyarrow cannot read it either
        pq.read_table(path).validate(full=True)
    return path


def test_damaged_pages_are_one_line_in_rank_check_inspect_and_corrupt(damaged, tmp_path):
    cannot_read = f"{damaged}: cannot read as parquet ("
    bad_text = f"{damaged}: invalid UTF-8 in column 'chosen'"
    for args in (["rank-check", damaged, "--bootstrap", "0"], ["inspect", damaged], ["inspect", damaged, "--json"]):
        line = assert_one_line_error(invoke(*args))
        assert cannot_read in line or bad_text in line, line
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(invoke("corrupt", damaged, out, *RATE))
    assert cannot_read in line or bad_text in line, line
    assert_nothing_written(out)


def test_damaged_pages_in_score(tmp_path):
    from prefnoise.noise import NoiseSpec, corrupt_frame
    from prefnoise.reward.synthetic import feature_pairs

    frame, _ = corrupt_frame(feature_pairs(200, seed=1), NoiseSpec(kind="symmetric", rate=0.1))
    train = tmp_path / "train.parquet"
    write_table(frame, train, entry={"command": "test"})
    model = tmp_path / "rm"
    fitted = invoke("fit-reward", train, "--loss", "sigmoid", "--out", model, "--epochs", "1")
    assert fitted.exit_code == 0, fitted.output
    data = tmp_path / "features.parquet"
    frame.write_parquet(data)
    damage(data, "chosen", "header")
    out = tmp_path / "scored.parquet"
    assert_one_line_error(invoke("score", model, data, out), f"{data}: cannot read as parquet (")
    assert_nothing_written(out)


# --- shard directories ----------------------------------------------------------------------------


def test_shards_with_different_types_name_both_shards_and_the_column(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    base = make_pairs(4, scores=False)
    base.with_columns(source=pl.lit(1)).write_parquet(shards / "a.parquet")
    base.with_columns(source=pl.lit("web")).write_parquet(shards / "b.parquet")
    expected = f"shards {shards / 'a.parquet'} and {shards / 'b.parquet'} differ: column 'source' has type int"
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("corrupt", shards, out, *RATE), expected)
    assert_nothing_written(out)
    assert_one_line_error(invoke("inspect", shards), expected)
    assert_one_line_error(invoke("rank-check", shards), expected)


def test_shards_with_different_columns_name_both_shards_and_the_column(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    base = make_pairs(4, scores=False)
    base.with_columns(lang=pl.lit("en")).write_parquet(shards / "a.parquet")
    base.write_parquet(shards / "b.parquet")
    line = assert_one_line_error(invoke("corrupt", shards, tmp_path / "out.parquet", *RATE))
    assert line == (
        f"Error: shards {shards / 'a.parquet'} and {shards / 'b.parquet'} differ: column 'lang' is in a.parquet "
        "but not in b.parquet; every shard needs the same columns"
    )


def test_shards_with_the_same_columns_in_another_order_are_read(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    frame = make_pairs(10)
    frame.head(6).write_parquet(shards / "a.parquet")
    frame.tail(4).select(reversed(frame.columns)).write_parquet(shards / "b.parquet")
    out = tmp_path / "out.parquet"
    assert invoke("corrupt", shards, out, "--rate", "0").exit_code == 0
    assert read_table(out)["chosen"].to_list() == frame["chosen"].to_list()
    assert open_source(shards).scan_raw().collect()["chosen_score"].to_list() == frame["chosen_score"].to_list()


# --- provenance metadata --------------------------------------------------------------------------

MALFORMED = {
    "invalid JSON": (b"{not json", "not valid JSON"),
    "a list": (b"[1, 2]", "a JSON list, not an object"),
    "history not a list": (b'{"history": 5}', "'history' is a JSON number, not a list"),
    "entries not objects": (b'{"history": [1, "x"]}', "history entry 1 is a JSON number, not an object"),
    "wrong field types": (b'{"history": [{"command": 3}]}', "history entry 1: 'command' is a JSON number"),
    "input not an object": (b'{"history": [{"command": "c", "input": 7}]}', "'input' is a JSON number"),
    "not UTF-8": (b'{"history": "\xff\xfe"}', "not UTF-8"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_provenance_never_stops_a_command(tmp_path, case):
    raw, reason = MALFORMED[case]
    source = tmp_path / "meta.parquet"
    pq.write_table(make_pairs(6).to_arrow().replace_schema_metadata({b"prefnoise": raw}), source)
    history, error = read_provenance(source)
    assert history == [] and reason in error
    assert read_history(source) == []
    assert open_source(source).history_error == error

    shown = invoke("inspect", source, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["history"] == []
    assert invoke("inspect", source).exit_code == 0

    out = tmp_path / "out.parquet"
    done = invoke("corrupt", source, out, *RATE)
    assert done.exit_code == 0, done.output
    assert [step["command"] for step in read_history(out)] == ["corrupt"]  # the history restarts here
    ranked = invoke("rank-check", source, "--pred", "score", "--bootstrap", "0", "--json")
    assert ranked.exit_code == 0, ranked.output


def test_well_formed_provenance_is_kept(tmp_path, pairs):
    source = tmp_path / "ok.parquet"
    write_table(pairs, source, entry={"command": "make", "parameters": {"n": 20}})
    history, error = read_provenance(source)
    assert error is None and [step["command"] for step in history] == ["make"]


# --- staying inside a directory -------------------------------------------------------------------


@pytest.fixture
def saved_dataset(tmp_path) -> Path:
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_polars(make_pairs(5, scores=False)).save_to_disk(str(path))
    return path


def set_data_files(saved: Path, names: list[str]) -> None:
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": name} for name in names]
    (saved / "state.json").write_text(json.dumps(state))


def test_a_saved_dataset_reads_fine(saved_dataset, tmp_path):
    out = tmp_path / "out.parquet"
    assert invoke("corrupt", saved_dataset, out, *RATE).exit_code == 0
    assert read_table(out).height == 5


@pytest.mark.parametrize("name", ["absolute", "dotdot", "nested dotdot"])
def test_saved_dataset_file_names_may_not_leave_the_directory(saved_dataset, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    arrow = next(saved_dataset.glob("*.arrow"))
    (outside / "x.arrow").write_bytes(arrow.read_bytes())
    filename = {
        "absolute": str(outside / "x.arrow"),
        "dotdot": "../outside/x.arrow",
        "nested dotdot": "sub/../../outside/x.arrow",
    }[name]
    set_data_files(saved_dataset, [filename])
    out = tmp_path / "out.parquet"
    assert_one_line_error(
        invoke("corrupt", saved_dataset, out, *RATE),
        f"{saved_dataset / 'state.json'}: data file name {filename!r} is absolute or climbs out with '..'",
    )
    assert_nothing_written(out)
    assert_one_line_error(invoke("inspect", saved_dataset), "absolute or climbs out")


def test_saved_dataset_data_file_linking_outside_is_refused(saved_dataset, tmp_path):
    arrow = next(saved_dataset.glob("*.arrow"))
    target = tmp_path / "elsewhere.arrow"
    target.write_bytes(arrow.read_bytes())
    arrow.unlink()
    arrow.symlink_to(target)
    assert_one_line_error(
        invoke("inspect", saved_dataset),
        f"data file '{arrow.name}' resolves to {target}, outside the directory",
    )


def test_saved_dataset_with_a_broken_state_json_is_one_line(saved_dataset):
    (saved_dataset / "state.json").write_text('{"_data_files": 5}')
    assert_one_line_error(invoke("inspect", saved_dataset), "'_data_files' is not a list")
    (saved_dataset / "state.json").write_text("{nope")
    assert_one_line_error(invoke("inspect", saved_dataset), "state.json: unreadable (")


def test_parquet_shard_linking_outside_is_refused(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    frame = make_pairs(4, scores=False)
    frame.write_parquet(shards / "a.parquet")
    secret = tmp_path / "secret.parquet"
    frame.write_parquet(secret)
    (shards / "b.parquet").symlink_to(secret)
    expected = f"{shards}: shard entry b.parquet links to {secret}, outside the directory"
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("corrupt", shards, out, *RATE), expected)
    assert_nothing_written(out)
    assert_one_line_error(invoke("inspect", shards), expected)
    assert_one_line_error(invoke("rank-check", shards), expected)
    # a link to a file inside the directory is fine
    (shards / "b.parquet").unlink()
    (shards / "sub").mkdir()
    frame.write_parquet(shards / "sub" / "real.parquet")
    os.symlink(Path("sub") / "real.parquet", shards / "b.parquet")
    assert open_source(shards).collect().height == 12


def test_fingerprint_never_reads_through_a_link_out_of_the_directory(saved_dataset, tmp_path):
    from prefnoise.data import file_fingerprint

    secret = tmp_path / "secret.txt"
    secret.write_text("one")
    (saved_dataset / "notes.txt").symlink_to(secret)
    before = file_fingerprint(saved_dataset)
    secret.write_text("two")
    assert file_fingerprint(saved_dataset) == before
