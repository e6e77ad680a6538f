"""One pair_id, one pair: ids shared by rows with different content are refused before anything is written."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.errors import PrefnoiseError
from prefnoise.pair_ids import PairIdCheck

runner = CliRunner()


def frames(rows: list[tuple[str, str, str, str]], batch: int = 2) -> list[pl.DataFrame]:
    frame = pl.DataFrame(rows, schema=["pair_id", "prompt", "chosen", "rejected"], orient="row")
    return [frame.slice(i, batch) for i in range(0, frame.height, batch)]


def consume(rows, batch: int = 2) -> int:
    parts = frames(rows, batch)
    check = PairIdCheck("t.parquet", reread=lambda: iter(parts))
    return sum(frame.height for frame in check.watch(iter(parts)))


def test_repeats_of_one_pair_in_either_orientation_are_fine():
    rows = [("a", "p", "x", "y"), ("b", "q", "x", "y"), ("a", "p", "y", "x"), ("a", "p", "x", "y"),
            ("c", "p", "x", "z")]
    assert consume(rows) == 5


def test_a_shared_id_is_named_with_its_rows_across_batches():
    rows = [("a", "p", "x", "y"), ("b", "q", "x", "y"), ("c", "r", "x", "y"), ("b", "q2", "x", "y")]
    with pytest.raises(PrefnoiseError) as error:
        consume(rows)
    assert error.value.message.startswith(
        "t.parquet: pair_id 'b' is shared by rows with different content (data rows 2 and 4; 1 such id(s))"
    )


def test_conflicts_are_counted():
    rows = [("a", "p", "x", "y"), ("a", "p", "x", "z"), ("b", "q", "x", "y"), ("b", "q", "w", "y")]
    check = PairIdCheck("t", reread=lambda: iter(frames(rows)))
    with pytest.raises(PrefnoiseError, match="'a' is shared .* 2 such id"):
        list(check.watch(iter(frames(rows, batch=3))))
    assert check.conflicting_id_hashes().size == 2


def test_corrupt_refuses_shared_ids_and_writes_nothing(tmp_path):
    data = tmp_path / "dup.parquet"
    pl.DataFrame({
        "pair_id": ["same"] * 50 + [f"id{i}" for i in range(50)],
        "prompt": [f"prompt {i}" for i in range(100)],
        "chosen": ["good"] * 100,
        "rejected": ["bad"] * 100,
    }).write_parquet(data)
    out = tmp_path / "noisy.parquet"
    result = runner.invoke(app, ["corrupt", str(data), str(out), "--rate", "0.3"])
    assert result.exit_code == 2
    assert "pair_id 'same' is shared by rows with different content (data rows 1 and 2" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.parquet"]


def test_the_input_is_read_again_only_when_an_id_repeats():
    unique = frames([("a", "p", "x", "y"), ("b", "q", "x", "y"), ("c", "r", "x", "y")])

    def never():
        raise AssertionError("read again although every id is unique")

    check = PairIdCheck("t", reread=never)
    assert sum(frame.height for frame in check.watch(iter(unique))) == 3
    assert check.repeated_id_hashes().size == 0
    repeated = frames([("a", "p", "x", "y"), ("b", "q", "x", "y"), ("a", "p", "y", "x")])
    reads = []
    check = PairIdCheck("t", reread=lambda: reads.append(1) or iter(repeated))
    assert sum(frame.height for frame in check.watch(iter(repeated))) == 3
    assert reads == [1] and check.repeated_id_hashes().size == 1  # 'a' twice, the same pair both times
