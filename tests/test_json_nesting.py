"""A nesting-depth limit on input (issue 22): JSON nested thousands deep crashed corrupt with a
segmentation fault (exit 139) inside Arrow's parser or polars; now it is a one-line error, exit 2."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from prefnoise.api import as_polars
from prefnoise.data import nesting, read_table
from prefnoise.data.nesting import MAX_NESTING, DepthCheckedJson, type_depth
from prefnoise.errors import PrefnoiseError

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _row(extra: str, i: int = 0) -> str:
    return f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b", "x": {extra}}}'


def _reference_depth(text: str) -> int:
    """The deepest bracket level outside strings, one character at a time."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _scan(text: str, step: int) -> None:
    """Read ``text`` through the check ``step`` bytes at a time; raise the error it records."""
    stream = DepthCheckedJson(pa.BufferReader(text.encode()), "t.jsonl")
    while stream.read(step):
        pass
    if stream.error is not None:
        assert stream.read(step) == b""  # the stream ends at the error
        raise stream.error


@pytest.mark.parametrize("seed", range(40))
def test_the_scanner_counts_brackets_outside_strings_across_any_read_size(seed, monkeypatch):
    rng = random.Random(seed)
    pieces = ['"a[b"', '"\\\\"', '"\\""', '"\\\\\\"[["', '"{{"', "[", "]", "{", "}", '"x"', ", ", "\\\\"]
    depth, parts = 0, []
    for _ in range(rng.randrange(50, 400)):
        piece = rng.choice(pieces)
        if piece in "]}" and depth == 0:
            continue
        depth += 1 if piece in "[{" else -1 if piece in "]}" else 0
        parts.append(piece)
    text = json.dumps(["".join(parts)]) + "".join(parts).replace("\\\\", "")  # strings, then raw brackets
    expected = _reference_depth(text)
    assert expected >= 2
    for step in (1, 2, 3, 7, 64, 10_000):
        monkeypatch.setattr(nesting, "MAX_NESTING", expected)  # the deepest point is allowed ...
        _scan(text, step)
        monkeypatch.setattr(nesting, "MAX_NESTING", expected - 1)  # ... and one level less is not
        with pytest.raises(PrefnoiseError, match=f"nests values more than {expected - 1} levels deep"):
            _scan(text, step)


def test_exactly_the_limit_is_read_and_one_more_is_refused_naming_the_line(tmp_path):
    ok = tmp_path / "ok.jsonl"
    # the row's own object is level 1, so the value may nest MAX_NESTING - 1 levels
    ok.write_text(GOOD + "\n" + _row(_nested(MAX_NESTING - 1)) + "\n")
    assert read_table(ok).height == 2
    deep = tmp_path / "deep.jsonl"
    deep.write_text(GOOD + "\n" + _row('"[[[[ in a string ]"', 1) + "\n" + _row(_nested(MAX_NESTING), 2) + "\n")
    with pytest.raises(PrefnoiseError) as caught:
        read_table(deep)
    assert caught.value.message == (
        f"{deep}: line 3 nests values more than 100 levels deep; prefnoise reads at most 100 (deeper input "
        "crashes the readers); flatten or drop that value"
    )


def test_gzipped_json_is_checked_too(tmp_path):
    path = tmp_path / "deep.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(GOOD + "\n" * 3 + _row(_nested(5000)) + "\n")
    with pytest.raises(PrefnoiseError, match=r"deep.jsonl.gz: line 4 nests values more than 100 levels"):
        read_table(path)


def test_arrow_types_nested_too_deeply_are_refused_before_polars(tmp_path):
    dtype = pa.int64()
    for _ in range(MAX_NESTING + 1):
        dtype = pa.list_(dtype)
    assert type_depth(dtype) == MAX_NESTING + 1
    assert type_depth(pa.struct([("a", pa.list_(pa.string())), ("b", pa.int8())])) == 2
    assert type_depth(pa.string()) == 0
    table = pa.table({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "deep": pa.array([None], type=dtype)})
    # Parquet has its own limit (100); an in-memory Arrow table reaches polars only through the check
    with pytest.raises(PrefnoiseError, match=r"<pyarrow.Table>: column 'deep' nests values more than 100 levels"):
        as_polars(table)


def test_corrupt_on_a_line_nested_5000_deep_exits_2_in_one_line(tmp_path):
    source = tmp_path / "deep.jsonl"
    source.write_text(GOOD + "\n" + _row(_nested(5000)) + "\n")  # a 10 KB line
    out = tmp_path / "out.parquet"
    for _ in range(3):  # an error raised inside Arrow's reading thread aborted the process now and then
        done = subprocess.run(
            [sys.executable, "-m", "prefnoise", "corrupt", str(source), str(out), "--rate", "0.1"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )
        assert done.returncode == 2, (done.returncode, done.stderr)  # was -11 / 139: a segmentation fault
        assert done.stderr == f"Error: {source}: line 2 nests values more than 100 levels deep; prefnoise " \
            "reads at most 100 (deeper input crashes the readers); flatten or drop that value\n"
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["deep.jsonl"]


def test_polars_reads_the_deepest_allowed_value():
    value: list = []
    for _ in range(MAX_NESTING - 1):
        value = [value]
    frame = pl.from_arrow(pa.table({"x": [value]}))
    assert frame.height == 1
