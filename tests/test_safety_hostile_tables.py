"""Hostile tables (wrong types, NaN scores, mixed formats) give one line and exit 2, never a crash.

A hostile-input sweep found: conversational and plain columns mixed crashed (AttributeError); a
message without role or content was rendered as "None"; ``--by column:NAME`` on strings or lists and
``--noise bt`` on text scores crashed, ``--by compare:NAME`` compared strings; a NaN score never
flipped and never counted as positive; ``rank-check`` crashed on text or list reward columns and
let ``inf`` through. The hand-written cases pin each; the property tests throw generated hostile
tables at ``corrupt`` and ``rank-check``.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prefnoise.data import canonicalize, read_table
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics import rank_report
from prefnoise.noise import CorruptionStats, NoiseSpec, corrupt_batches, corrupt_frame, exact_thresholds
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import make_pairs

ASYM = ["--noise", "asymmetric", "--rate-pos", "0.3", "--rate-neg", "0.1"]








def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def messages(*turns: str | None, role: str | None = "user") -> list[dict]:
    return [{"role": role if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


# --- conversational and plain columns -------------------------------------------------------------


@pytest.mark.parametrize(
    "row, described",
    [
        (
            {"prompt": "p", "chosen": messages("hi", "a"), "rejected": "b"},
            "'chosen' holds messages; 'rejected' holds plain text",
        ),
        (
            {"prompt": "p", "chosen": messages("hi", "a"), "rejected": messages("hi", "b")},
            "'prompt' holds plain text; 'chosen' holds messages",
        ),
        (
            {"prompt": messages("q"), "chosen": "a", "rejected": "b"},
            "'prompt' holds messages; 'chosen' holds plain text",
        ),
        (
            {"chosen": messages("hi", "a"), "rejected": 7},
            "'rejected' holds Int64",
        ),
    ],
)
def test_mixed_conversational_and_plain_columns_are_one_line(tmp_path, row, described):
    source = write_jsonl(tmp_path / "mixed.jsonl", [row])
    out = tmp_path / "out.parquet"
    assert_one_line_error(
        invoke("corrupt", source, out, "--rate", "0.2"),
        f"{source}: columns mix conversational messages (lists of {{role, content}}) with other values",
        described,
    )
    assert_nothing_written(out)


def test_messages_without_role_or_content_are_invalid_rows(tmp_path):
    good = {"chosen": messages("hi", "yes"), "rejected": messages("hi", "no")}
    rows = [
        good,
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant"}], "rejected": messages("hi", "no")},
        {"chosen": messages("hi", "yes"), "rejected": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"chosen": messages("hey", "sure"), "rejected": messages("hey", "nope")},
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out.parquet"
    assert_one_line_error(
        invoke("corrupt", source, out, "--rate", "0.2"),
        f"{source}: 2 row(s) with a message without role or content, first at row 2",
    )
    assert_nothing_written(out)
    done = invoke("corrupt", source, out, "--rate", "0", "--drop-invalid", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["dropped"] == {"a message without role or content": 2}
    table = read_table(out)
    assert table["chosen"].to_list() == ["yes", "sure"] and table["prompt"].to_list() == ["user: hi", "user: hey"]


def test_a_null_message_is_one_line(tmp_path):
    # pyarrow's JSON reader builds an invalid list for a null struct inside a list; the batch check catches it
    rows = [{"chosen": [None, {"role": "assistant", "content": "x"}], "rejected": messages("hi", "no")}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(invoke("corrupt", source, out, "--rate", "0.2"), f"{source}: ")
    assert "column 'chosen' could not be read" in line or "a message without role or content" in line
    assert_nothing_written(out)


def test_message_content_that_is_not_text_is_one_line(tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    source = write_jsonl(tmp_path / "multimodal.jsonl", [{"chosen": parts, "rejected": parts}])
    assert_one_line_error(
        invoke("corrupt", source, tmp_path / "out.parquet", "--rate", "0.2"),
        "messages in column 'chosen' have 'content' of type List(",
    )


def test_reserved_double_underscore_columns_do_not_collide(tmp_path):
    frame = make_pairs(3, scores=False).with_columns(__row=pl.lit(9), __index_level_0__=pl.int_range(3))
    table, dropped = canonicalize(frame)
    assert dropped == {} and table.columns == ["pair_id", "prompt", "chosen", "rejected"]


def test_pair_id_of_a_list_type_is_one_line(tmp_path):
    source = tmp_path / "ids.parquet"
    make_pairs(3, scores=False).with_columns(pair_id=pl.lit([1, 2])).write_parquet(source)
    assert_one_line_error(
        invoke("corrupt", source, tmp_path / "out.parquet", "--rate", "0.2"),
        "column 'pair_id' has type List(Int64); expected text or integer ids",
    )


def test_null_pair_id_is_an_invalid_row(tmp_path):
    source = tmp_path / "ids.parquet"
    make_pairs(4, scores=False).with_columns(pair_id=pl.Series(["a", None, "c", "d"])).write_parquet(source)
    assert_one_line_error(
        invoke("corrupt", source, tmp_path / "out.parquet", "--rate", "0.2"),
        "1 row(s) with null 'pair_id', first at row 2",
    )


# --- noise-model columns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, dtype",
    [(["a", "b", "c", "d"], "String"), ([0.5, 1.0, 0.0, 2.0], "Float64"), ([[1], [0], [1], [0]], "List(Int64)")],
)
def test_by_column_needs_a_boolean_column(tmp_path, values, dtype):
    source = tmp_path / "t.parquet"
    make_pairs(4, scores=False).with_columns(flag=pl.Series(values)).write_parquet(source)
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(invoke("corrupt", source, out, *ASYM, "--by", "column:flag"))
    assert line == (
        "Error: --by column:flag needs a boolean column (true marks a positive pair; integers 0/1 work too); "
        f"column 'flag' has type {dtype}"
    )
    assert_nothing_written(out)


def test_by_column_accepts_booleans_and_integers(tmp_path):
    source = tmp_path / "t.parquet"
    flags = [1, 0, 1, 1, 0, 0, 1, 0]
    make_pairs(8, scores=False).with_columns(flag=pl.Series(flags)).write_parquet(source)
    out = tmp_path / "out.parquet"
    done = invoke(
        "corrupt", source, out, "--noise", "asymmetric", "--rate-pos", "1", "--rate-neg", "0", "--force",
        "--by", "column:flag", "--json",
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["groups"]["positive"]["flips"] == 4 and summary["groups"]["negative"]["flips"] == 0
    assert read_table(out)["flipped"].to_list() == [bool(f) for f in flags]


def test_by_compare_and_bt_need_numeric_columns(tmp_path):
    source = tmp_path / "t.parquet"
    base = make_pairs(4, scores=False)
    base.with_columns(chosen_len=pl.lit("long"), rejected_len=pl.lit("short")).write_parquet(source)
    assert_one_line_error(
        invoke("corrupt", source, tmp_path / "o.parquet", *ASYM, "--by", "compare:len"),
        "--by compare:len needs numeric chosen_len and rejected_len",
        "column 'chosen_len' has type String",
    )
    base.with_columns(chosen_score=pl.lit("9"), rejected_score=pl.lit("1")).write_parquet(source)
    assert_one_line_error(
        invoke("corrupt", source, tmp_path / "o.parquet", "--noise", "bt"),
        "--noise bt needs numeric true scores; column 'chosen_score' has type String",
    )


BAD_SCORES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "null": None}


@pytest.mark.parametrize("bad", list(BAD_SCORES))
@pytest.mark.parametrize("model", ["bt", "compare"])
def test_unusable_scores_name_column_and_row(tmp_path, bad, model):
    frame = make_pairs(6)
    scores = frame["rejected_score"].to_list()
    scores[3] = BAD_SCORES[bad]
    source = tmp_path / "scores.parquet"
    frame.with_columns(rejected_score=pl.Series(scores, dtype=pl.Float64)).write_parquet(source)
    pair_id = read_table(source)["pair_id"][3]
    args = ["--noise", "bt"] if model == "bt" else [*ASYM, "--by", "compare:score"]
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(invoke("corrupt", source, out, *args))
    flag = "--noise bt" if model == "bt" else "--by compare:score"
    assert f"{flag}: column 'rejected_score' is {bad} at row 4 (pair_id {pair_id}); it needs a finite number" in line
    assert "--drop-invalid" in line
    assert_nothing_written(out)


def test_drop_invalid_skips_and_counts_unusable_scores_in_the_library():
    frame = canonicalize(make_pairs(10))[0]
    chosen = frame["chosen_score"].to_list()
    chosen[2], chosen[7] = math.nan, math.inf
    rejected = frame["rejected_score"].to_list()
    rejected[5] = None
    frame = frame.with_columns(
        chosen_score=pl.Series(chosen, dtype=pl.Float64), rejected_score=pl.Series(rejected, dtype=pl.Float64)
    )
    with pytest.raises(PrefnoiseError, match=r"column 'chosen_score' is nan at row 3 "):
        corrupt_frame(frame, NoiseSpec(kind="bt"))
    out, stats = corrupt_frame(frame, NoiseSpec(kind="bt", drop_invalid=True))
    assert stats.dropped == {"null or non-finite 'chosen_score'": 2, "null or non-finite 'rejected_score'": 1}
    assert out.height == stats.rows == 7
    assert set(out["pair_id"]) == set(frame["pair_id"]) - {frame["pair_id"][i] for i in (2, 5, 7)}

    # compare:NAME with --exact: the first pass skips the same rows, so exactly round(rate * n) flip per group
    spec = NoiseSpec(kind="asymmetric", rate_pos=0.5, rate_neg=0.5, by="compare:score", exact=True, drop_invalid=True)
    batches = [frame.head(4), frame.tail(6)]
    thresholds = exact_thresholds(batches, spec)
    stats = CorruptionStats()
    flipped = pl.concat(list(corrupt_batches(batches, spec, stats=stats, thresholds=thresholds)))
    assert flipped.height == 7 and sum(stats.dropped.values()) == 3
    assert stats.groups["positive"].flips == round(0.5 * stats.groups["positive"].rows)


def test_row_numbers_count_across_batches():
    frame = canonicalize(make_pairs(10))[0]
    scores = frame["chosen_score"].to_list()
    scores[8] = math.nan
    frame = frame.with_columns(chosen_score=pl.Series(scores))
    with pytest.raises(PrefnoiseError, match=r"^in\.parquet: --noise bt: column 'chosen_score' is nan at row 9 "):
        list(corrupt_batches([frame.head(5), frame.tail(5)], NoiseSpec(kind="bt"), name="in.parquet"))


# --- rank-check -----------------------------------------------------------------------------------


def scored_pairs(n: int = 6) -> pl.DataFrame:
    frame = make_pairs(n)
    return frame.with_columns(chosen_reward=pl.col("chosen_score"), rejected_reward=pl.col("rejected_score"))


@pytest.mark.parametrize(
    "columns, args, message",
    [
        ({"chosen_reward": "a", "rejected_reward": "b"}, [], "--pred reward: column 'chosen_reward' has type String"),
        ({"chosen_r": [1.0], "rejected_r": [2.0]}, ["--pred", "r"], "--pred r: column 'chosen_r' has type List"),
        ({"chosen_score": "x", "rejected_score": "y"}, [], "--true score: column 'chosen_score' has type String"),
        ({"prompt_id": 1, "reward": "x", "score": 1.0}, ["--long"], "--pred reward: column 'reward' has type String"),
        ({"g": [1, 2]}, ["--group-by", "g"], "--group-by g: column 'g' has type List(Int64)"),
    ],
)
def test_rank_check_needs_numeric_rewards_and_scalar_splits(tmp_path, columns, args, message):
    source = tmp_path / "t.parquet"
    scored_pairs().with_columns(**{k: pl.lit(v) for k, v in columns.items()}).write_parquet(source)
    line = assert_one_line_error(invoke("rank-check", source, "--bootstrap", "0", *args), message)
    assert "numeric column" in line or "single values" in line


def test_rank_check_splits_by_a_text_column(tmp_path):
    source = tmp_path / "t.parquet"
    scored_pairs().with_columns(source=pl.Series(["web", "book"] * 3)).write_parquet(source)
    done = invoke("rank-check", source, "--bootstrap", "0", "--group-by", "source", "--json")
    assert done.exit_code == 0, done.output
    assert sorted(json.loads(done.stdout)["splits"]["source"]) == ["book", "web"]


def test_rank_check_skips_and_counts_null_nan_and_inf_rewards(tmp_path):
    # 6 usable pairs: 4 ranked right, 2 wrong; 4 more rows each with one unusable value
    frame = pl.DataFrame(
        {
            "prompt": [f"p{i}" for i in range(10)],
            "chosen": [f"c{i}" for i in range(10)],
            "rejected": [f"r{i}" for i in range(10)],
            "chosen_score": [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, None, 2.0, 2.0],
            "rejected_score": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -math.inf, 1.0],
            "chosen_reward": [5.0, 5.0, 5.0, 5.0, 0.0, 0.0, math.nan, 5.0, 5.0, 5.0],
            "rejected_reward": [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, math.inf],
        }
    )
    source = tmp_path / "t.parquet"
    frame.write_parquet(source)
    done = invoke("rank-check", source, "--bootstrap", "0", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["dropped_rows"] == 4 and report["overall"]["rows"] == 6
    agreement = report["overall"]["agreement"]
    assert agreement["value"] == pytest.approx(4 / 6) and agreement["pairs"] == 6
    assert math.isfinite(report["overall"]["kendall_tau_b"])
    # the same rule in the library, for a long table too
    long = pl.DataFrame(
        {"prompt_id": [0, 0, 0, 1, 1], "score": [1.0, 2.0, math.inf, 1.0, 2.0], "reward": [1, 2, 3, 2, None]}
    )
    report = rank_report(long.lazy(), n_boot=0)
    assert report.dropped_rows == 2 and report.overall.rows == 3
    assert report.overall.agreement.value == 1.0


def test_rank_check_plot_with_non_finite_rewards(tmp_path):
    frame = scored_pairs(20)
    rewards = frame["chosen_reward"].to_list()
    rewards[0], rewards[1] = math.inf, math.nan
    source = tmp_path / "t.parquet"
    frame.with_columns(chosen_reward=pl.Series(rewards)).write_parquet(source)
    done = invoke("rank-check", source, "--bootstrap", "0", "--plot", tmp_path / "fig.png")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "fig.png").stat().st_size > 0


# --- property tests -------------------------------------------------------------------------------

# Mostly usable values with hostile ones mixed in (a repeated branch is drawn more often), so that
# both outcomes, a written file and a one-line error, are common.
WEIRD_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
TEXT = st.one_of(
    WEIRD_TEXT,
    WEIRD_TEXT,
    WEIRD_TEXT,
    st.sampled_from(["", " ", "same", "\x00", "é", "😀", "\u200b", "\n\nAssistant: hi"]),
    st.integers(1_000, 20_000).map(lambda n: "x" * n),
)
FINITE = st.floats(-1e300, 1e300, allow_nan=False)
BAD_FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, None])
FLOAT = st.one_of(FINITE, BAD_FLOAT)
EXTRA = {  # a column of one hostile kind per table: strategy for a value, and its polars type
    "int": (st.one_of(st.integers(-5, 5), st.none()), pl.Int64),
    "bool": (st.one_of(st.booleans(), st.none()), pl.Boolean),
    "float": (FLOAT, pl.Float64),
    "text": (st.one_of(TEXT, st.none()), pl.String),
    "list": (st.one_of(st.lists(st.integers(0, 3), max_size=3), st.none()), pl.List(pl.Int64)),
}


def poison(draw, values: list, bad: st.SearchStrategy) -> list:
    """``values`` with a few entries (none in most tables) replaced by draws from ``bad``."""
    values = list(values)
    if draw(st.sampled_from([False, False, True])):
        for index in draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=2)):
            values[index] = draw(bad)
    return values


@st.composite
def hostile_tables(draw, *, rewards: bool) -> pl.DataFrame:
    n = draw(st.integers(1, 8))
    texts = st.lists(TEXT, min_size=n, max_size=n)
    data: dict[str, pl.Series] = {
        "prompt": pl.Series(draw(st.lists(st.one_of(TEXT, st.sampled_from(["p0", "p1"])), min_size=n, max_size=n))),
        "chosen": pl.Series(poison(draw, draw(texts), st.none()), dtype=pl.String),
        "rejected": pl.Series(poison(draw, [f"{t} (other)" for t in draw(texts)], TEXT), dtype=pl.String),
    }
    for name in ["score"] + (["reward"] if rewards else []):
        for side in ("chosen", "rejected"):
            values = poison(draw, draw(st.lists(FINITE, min_size=n, max_size=n)), BAD_FLOAT)
            data[f"{side}_{name}"] = pl.Series(values, dtype=pl.Float64)
    kind = draw(st.sampled_from(sorted(EXTRA)))
    values, dtype = EXTRA[kind]
    data["extra"] = pl.Series(draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    if draw(st.sampled_from([False] * 5 + [True])):  # a mistyped required column
        data[draw(st.sampled_from(["chosen", "rejected"]))] = data["extra"]
    frame = pl.DataFrame(data)
    duplicates = draw(st.lists(st.integers(0, n - 1), max_size=3))
    return pl.concat([frame, frame[duplicates]]) if duplicates else frame


def check_failure(result, out: Path | None = None) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
        if out is not None:
            assert_nothing_written(out)


NOISE_ARGS = st.sampled_from(
    [
        ["--rate", "0.3"],
        ["--rate", "0.4", "--exact"],
        ["--noise", "bt"],
        ["--noise", "uniform"],
        [*ASYM, "--by", "compare:score"],
        [*ASYM, "--by", "column:extra"],
        [*ASYM, "--by", "longer", "--exact"],
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    table=hostile_tables(rewards=False),
    noise=NOISE_ARGS,
    drop=st.booleans(),
    form=st.sampled_from(["parquet", "jsonl", "csv"]),
)
def test_corrupt_survives_hostile_tables(table, noise, drop, form):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"in.{form}"
        if form == "parquet":
            table.write_parquet(source)
        elif form == "jsonl":
            with contextlib.suppress(Exception):  # polars refuses some tables; then write what JSON allows
                table.write_ndjson(source)
            if not source.exists():
                return
        else:
            flat = table.select(pl.exclude(pl.List(pl.Int64)))
            flat.write_csv(source)
        out = Path(tmp) / "out.parquet"
        result = invoke("corrupt", source, out, *noise, *(["--drop-invalid"] if drop else []), "--json")
        event(f"exit {result.exit_code}")
        check_failure(result, out)
        if result.exit_code == 0:
            summary = json.loads(result.stdout)
            written = pq.read_table(out)
            written.validate(full=True)
            again = pl.read_parquet(out)
            assert written.num_rows == again.height == summary["rows"]
            assert again.height == table.height - sum(summary["dropped"].values())
            assert again["flipped"].sum() == summary["flips"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    table=hostile_tables(rewards=True),
    options=st.sampled_from(
        [[], ["--true", "nothing"], ["--group-by", "extra"], ["--show-worst", "3"], ["--pred", "score"]]
    ),
)
def test_rank_check_survives_hostile_tables(table, options):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.parquet"
        table.write_parquet(source)
        result = invoke("rank-check", source, "--bootstrap", "20", "--json", *options)
        event(f"exit {result.exit_code}")
        check_failure(result)
        if result.exit_code == 0:
            report = json.loads(result.stdout)
            assert report["overall"]["rows"] + report["dropped_rows"] == table.height
            value = report["overall"]["agreement"]["value"]
            assert value is None or 0.0 <= value <= 1.0
