"""Options objects: every rule checked once at construction, errors naming the keyword through Python and
the flag through the CLI; every options field is a flag of the same name (and the reverse); -h is --help."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect

import polars as pl
import pytest
import typer

import prefnoise as pn
from prefnoise.cli import app
from prefnoise.cli.common import COMMAND_OPTIONS, ENGINE_COMMANDS, INPUT_OPTIONS
from prefnoise.options import (
    CorruptOptions,
    EngineOptions,
    OptionError,
    RankCheckOptions,
    ReproduceAlignmentOptions,
    ReproduceSyntheticOptions,
    ScoreOptions,
    SplitOptions,
    flag_of,
)
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import make_pairs

# Parameters a command has that are not fields of its options object, each with its reason.
CLI_ONLY = {
    "json_output": "how the result is printed (--json), not what the command does",
    "overwrite": "the output policy (prefnoise.outputs), given to the API beside the options",
    "plot": "an output path (rank-check's figure)",
    "out": "an output path (reproduce's directory, audit's table; align and fit-reward hold it as a field)",
    "estimate_only": "audit --estimate-only: print the estimate alone (how the result is printed)",
    "dry_run": "align --dry-run: check and plan without training (what to do with the options, not one of them)",
    **{name: "a shared input option (how the table is read), given to the API beside the options"
       for name in INPUT_OPTIONS},
}


# Commands without an options object, each with its reason.
NO_OPTIONS_OBJECT = {"inspect": "no options but the shared input options and --json"}
# Commands whose options classes land from other branches: once the module exists, the command must
# register its class (register_options in its prefnoise/cli module) and so comes under the parity test.
LANDING = {
    "fit-reward": ("prefnoise.options.fit_reward", "FitRewardConfig"),
    "align": ("prefnoise.options.align", "AlignConfig"),
    "audit": ("prefnoise.options.audit", "AuditOptions"),
}


def _command_paths(command=None, prefix: str = "") -> list[str]:
    """Every leaf command of the app as a path: "corrupt", "reproduce synthetic", ..."""
    command = command or typer.main.get_command(app)
    paths = []
    for name, sub in getattr(command, "commands", {}).items():
        path = f"{prefix}{name}"
        paths += _command_paths(sub, path + " ") if hasattr(sub, "commands") else [path]
    return paths


def test_every_command_builds_a_registered_options_object_or_says_why_not():
    paths = set(_command_paths())
    assert "reproduce alignment" in paths and "corrupt" in paths
    landed = {path for path, (module, _) in LANDING.items() if importlib.util.find_spec(module) is not None}
    for path in landed:
        module, name = LANDING[path]
        expected = getattr(importlib.import_module(module), name)
        assert COMMAND_OPTIONS.get(path) is expected, f"register_options({path!r}, {name}) in its CLI module"
    assert paths - set(COMMAND_OPTIONS) - set(NO_OPTIONS_OBJECT) - (set(LANDING) - landed) == set()
    assert set(COMMAND_OPTIONS) & set(NO_OPTIONS_OBJECT) == set()


def _command(path: str):
    """The click command of ``prefnoise PATH`` (typer vendors its own click, so no isinstance checks)."""
    command = typer.main.get_command(app)
    for part in path.split():
        command = command.commands[part]
    return command


def test_every_options_field_is_a_flag_of_the_same_name_and_the_reverse():
    assert {"corrupt", "split", "score", "rank-check", "reproduce synthetic", "reproduce alignment"} <= set(
        COMMAND_OPTIONS
    )
    for path, cls in COMMAND_OPTIONS.items():
        command = _command(path)
        flags = {p.name for p in command.params if p.param_type_name == "option"}
        fields = {f.name for f in dataclasses.fields(cls)} | (ENGINE_FIELDS if path in ENGINE_COMMANDS else set())
        assert fields - flags == set(), (path, "fields without a flag")
        lent = {p.name for p in _command(BORROWED[path]).params} if path in BORROWED else set()
        assert flags - fields - set(CLI_ONLY) - lent == set(), (path, "flags that are not options fields")
        assert path in ENGINE_COMMANDS or not flags & ENGINE_FIELDS, (path, "engine flags: register_engine(path)")
        for param in command.params:  # the flag is the field's name spelled the CLI's way
            if param.param_type_name == "option" and param.name in fields:
                assert "--" + param.name.replace("_", "-") in param.opts, (path, param.opts)


ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineOptions)}


def test_the_engine_flags_are_engine_options_fields_with_their_defaults():
    assert ENGINE_FIELDS == {"engine", "ray_address", "workers"}
    for path in ENGINE_COMMANDS:
        params = {p.name: p for p in _command(path).params}
        for item in dataclasses.fields(EngineOptions):
            assert params[item.name].default == item.default, (path, item.name)
            assert flag_of(item.name) in params[item.name].opts, (path, params[item.name].opts)


# Where a command's flag or API keyword default differs from its field's, on purpose.
DEFAULT_EXCEPTIONS = {
    ("rank-check", "group_by"): "repeatable flag: None (none given) becomes the field's ()",
    ("rank-check", "memory_responses"): "the flag shows the library's default; the field's None means that default",
    ("reproduce data", "losses"): "comma-separated flag: the field's names joined by commas",
    ("reproduce data", "rates"): "comma-separated flag: the field's rates joined by commas",
}
# Commands that take another command's options too: their extra flags must be that command's flags.
BORROWED = {"reproduce data": "fit-reward"}
API_OF = {"corrupt": pn.corrupt, "split": pn.split, "score": pn.score, "rank-check": pn.rank_check}


def test_flags_and_api_keywords_default_to_their_fields_defaults():
    for path, cls in COMMAND_OPTIONS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        flags = {p.name: p.default for p in _command(path).params if p.name in defaults}
        api = inspect.signature(API_OF[path]).parameters if path in API_OF else {}
        for name, default in defaults.items():
            if (path, name) in DEFAULT_EXCEPTIONS or default is dataclasses.MISSING:  # a required field
                continue
            assert flags[name] == default, (path, name, flags[name], default)
            if name in api:
                assert api[name].default == default, (path, name, api[name].default, default)
        assert path not in API_OF or set(defaults) <= set(api), (path, "fields that are no API keyword")
    reproduce = inspect.signature(pn.reproduce).parameters  # None: the experiment's own default
    for cls in (ReproduceSyntheticOptions, ReproduceAlignmentOptions):
        assert all(reproduce[f.name].default is None for f in dataclasses.fields(cls)), cls


@pytest.mark.parametrize("path", ["", "corrupt", "rank-check", "reproduce", "reproduce synthetic"])
def test_dash_h_is_help(path):
    args = path.split()
    short, long = invoke(*args, "-h"), invoke(*args, "--help")
    assert short.exit_code == 0 == long.exit_code
    assert short.stdout == long.stdout and "Usage: " in short.stdout


# --------------------------------------------------------------------------- one rule, two spellings


@pytest.mark.parametrize(
    ("build", "keyword", "flag"),
    [
        (lambda: CorruptOptions(rate=0.7), "rate= 0.7 flips at least half the labels", "--rate 0.7 flips at least"),
        (lambda: CorruptOptions(rate=0.7), "pass force=True if that", "pass --force if that"),
        (lambda: CorruptOptions(rate=1.5), "rate= must be in [0, 1], got 1.5", "--rate must be in [0, 1], got 1.5"),
        (lambda: CorruptOptions(), "rate= is required for this noise model", "--rate is required"),
        (
            lambda: CorruptOptions(noise="asymmetric", rate_pos=0.6, rate_neg=0.5),
            "rate_pos= + rate_neg = 1.1 >= 1",
            "--rate-pos + --rate-neg = 1.1 >= 1",
        ),
        (
            lambda: CorruptOptions(noise="asymmetric", rate_pos=0.1, rate_neg=0.1, by="shorter"),
            "unknown by rule 'shorter'",
            "unknown --by rule 'shorter'",
        ),
        (lambda: CorruptOptions(noise="bt", temperature=0), "temperature= must be > 0", "--temperature must be > 0"),
        (lambda: CorruptOptions(noise="bt", exact=True), "exact applies to symmetric", "--exact applies to symmetric"),
        (lambda: CorruptOptions(noise="gaussian"), "noise= unknown noise model 'gaussian'", "--noise unknown noise"),
        (lambda: SplitOptions(by="row"), "by= must be one of: prompt, pair; got 'row'", "--by must be one of"),
        (lambda: SplitOptions(test_fraction=1.0), "test_fraction= must be in (0, 1), got 1", "--test-fraction must"),
        (lambda: ScoreOptions(batch_size=0), "batch_size= must be >= 1, got 0", "--batch-size must be >= 1, got 0"),
        (
            lambda: RankCheckOptions(model="m", long=True),
            "model= scores a pair table; it does not apply with long=True",
            "--model scores a pair table; it does not apply with --long",
        ),
        (lambda: RankCheckOptions(min_kendall=-2.0), "min_kendall= must be in [-1, 1], got -2", "--min-kendall"),
        (lambda: ReproduceSyntheticOptions(rates="a"), "rates= takes comma-separated numbers, got 'a'", "--rates"),
        (lambda: ReproduceSyntheticOptions(seeds=0), "seeds= must be >= 1, got 0", "--seeds must be >= 1, got 0"),
        (lambda: ReproduceAlignmentOptions(pairs=10), "pairs= must be >= 40, got 10", "--pairs must be >= 40"),
    ],
)
def test_a_bad_option_names_the_keyword_in_python_and_the_flag_in_the_cli(build, keyword, flag):
    with pytest.raises(OptionError) as caught:
        build()
    assert keyword in str(caught.value)
    assert flag in caught.value.as_flag()
    assert isinstance(caught.value, ValueError)


def test_options_are_frozen_and_normalised():
    options = CorruptOptions(rate=0.2, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.rate = 0.3  # type: ignore[misc]
    assert options.replace(rate=0.3).rate == 0.3 and options.rate == 0.2
    with pytest.raises(OptionError, match="rate= 0.6 flips"):
        options.replace(rate=0.6)  # a copy is checked again
    assert RankCheckOptions(group_by="flipped").group_by == ("flipped",)
    assert RankCheckOptions(group_by=["a", "b"]).group_by == ("a", "b")
    synthetic = ReproduceSyntheticOptions(rates="0, 0.4", noise="symmetric,feature", losses=("ramp",))
    assert (synthetic.rates, synthetic.noise, synthetic.losses) == ((0.0, 0.4), ("symmetric", "feature"), ("ramp",))


def test_python_calls_raise_the_keyword_and_the_cli_the_flag(tmp_path):
    frame = make_pairs(20, seed=1)
    with pytest.raises(OptionError, match=r"^rate= 0.7 flips at least half"):
        pn.corrupt(frame, rate=0.7)
    with pytest.raises(OptionError, match=r"^by= must be one of: prompt, pair; got 'row'"):
        pn.split(frame, by="row")
    with pytest.raises(OptionError, match=r"^by= must be one of"):
        pn.split_table(frame, test_fraction=0.2, by="row")
    path = tmp_path / "pairs.parquet"
    frame.write_parquet(path)
    result = invoke("split", path, tmp_path / "a.parquet", tmp_path / "b.parquet", "--by", "row")
    assert_one_line_error(result, "--by must be one of: prompt, pair; got 'row'")


def test_an_options_object_or_keywords_not_both():
    frame = make_pairs(40, seed=2)
    by_object = pn.corrupt(frame, options=CorruptOptions(rate=0.3, seed=5))
    by_keywords = pn.corrupt(frame, rate=0.3, seed=5)
    assert by_object.table.equals(by_keywords.table) and by_object.summary["flips"] == by_keywords.summary["flips"]
    assert by_object.summary["flips"] == int(by_object.table["flipped"].sum()) > 0
    with pytest.raises(TypeError, match="not both"):
        pn.corrupt(frame, options=CorruptOptions(rate=0.3), rate=0.2)
    with pytest.raises(TypeError, match="takes a CorruptOptions"):
        pn.corrupt(frame, options=SplitOptions())
    train, test = pn.split(frame, options=SplitOptions(test_fraction=0.5, by="pair", seed=1))
    assert train.height + test.height == 40
    assert pn.split(frame, test_fraction=0.5, by="pair", seed=1).test.equals(test)


def test_corrupt_frame_takes_any_table_type():
    frame = pn.as_polars(make_pairs(200, seed=4))  # canonical: with pair_id
    expected, stats = pn.corrupt_frame(frame, pn.NoiseSpec(rate=0.3, seed=1))
    for table in (frame.to_pandas(), frame.to_arrow(), frame.to_dicts()):
        got, got_stats = pn.corrupt_frame(table, CorruptOptions(rate=0.3, seed=1))
        assert isinstance(got, pl.DataFrame) and got.equals(expected)
        assert got_stats.flips == stats.flips
    assert 30 < stats.flips < 90  # 200 pairs at 30%: 60 expected
