"""Option validation: every numeric option is finite and in its range, refused the same way in every command."""

from __future__ import annotations

import functools
import math

import pytest
import typer
from typer.testing import CliRunner

from prefnoise.cli import app
from prefnoise.errors import PrefnoiseError
from prefnoise.options import OPTION_RANGES, OptionError, check_options

runner = CliRunner()


@functools.cache
def commands() -> dict[str, object]:
    """Every leaf command by its full name ('corrupt', 'reproduce synthetic', ...)."""
    found = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = command

    walk(typer.main.get_command(app), [])
    return found


def required_args(command) -> list[str]:
    """Placeholder values for the arguments and required options (the option check runs first)."""
    args = []
    for param in command.params:
        if getattr(param, "required", False):
            args += ([param.opts[0]] if param.opts[0].startswith("--") else []) + ["missing-input"]
    return args


def param_type(param) -> str:
    """The name of the type typer converts the option to ('float' for ``float | None``)."""
    return str(param.bare_type())


def numeric_options() -> list[tuple[str, str, str]]:
    cases = []
    for name, command in commands().items():
        for param in command.params:
            numeric = param.name in OPTION_RANGES or param_type(param) in ("float", "int")
            if param.opts[0].startswith("--") and numeric:
                cases.append((name, param.opts[0], param.name))
    return cases


NUMERIC = numeric_options()


def out_of_range(option: str) -> str:
    low, low_in, high, high_in = OPTION_RANGES[option]
    if low is not None:
        return str(low - 1 if low_in else low)
    return str(high + 1 if high_in else high)


def invoke(name: str, *extra: str):
    command = commands()[name]
    return runner.invoke(app, [*name.split(), *required_args(command), *extra])


def assert_refused(result, flag: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {flag} must be"), result.stderr
    return lines[0]


def test_the_sweep_covers_every_command_with_numbers():
    assert {name for name, _, _ in NUMERIC} == {
        "align", "audit", "corrupt", "fit-reward", "rank-check", "score", "split", "reproduce synthetic",
        "reproduce alignment", "reproduce data",
    }
    assert len(NUMERIC) >= 60


@pytest.mark.parametrize(("name", "flag", "option"), NUMERIC, ids=[f"{n}:{f}" for n, f, _ in NUMERIC])
def test_every_numeric_option_is_checked_for_range(name, flag, option):
    assert option in OPTION_RANGES, f"{name} {flag} has no range rule"
    line = assert_refused(invoke(name, flag, out_of_range(option)), flag)
    assert "got" in line


FLOAT_OPTIONS = [
    (name, flag) for name, flag, option in NUMERIC
    if param_type(next(p for p in commands()[name].params if p.name == option)) == "float"
]


@pytest.mark.parametrize(("name", "flag"), FLOAT_OPTIONS, ids=[f"{n}:{f}" for n, f in FLOAT_OPTIONS])
def test_non_finite_floats_are_refused(name, flag):
    for value in ("nan", "-inf") if flag != "--lr" else ("nan", "inf", "-inf"):
        line = assert_refused(invoke(name, flag, value), flag)
        assert line.endswith(f"must be a finite number, got {value}")


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("fit-reward", ["--hidden", "0"], "--hidden must be >= 1, got 0"),
        ("fit-reward", ["--layers", "-1"], "--layers must be >= 0, got -1"),
        ("fit-reward", ["--dropout", "2"], "--dropout must be in [0, 1), got 2"),
        ("fit-reward", ["--max-length", "0"], "--max-length must be >= 1, got 0"),
        ("fit-reward", ["--output-clip", "nan"], "--output-clip must be a finite number, got nan"),
        ("rank-check", ["--bootstrap", "-5"], "--bootstrap must be >= 0, got -5"),
        ("rank-check", ["--min-agreement", "nan"], "--min-agreement must be a finite number, got nan"),
        ("audit", ["--show-suspects", "-3"], "--show-suspects must be >= 0, got -3"),
        ("align", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ],
)
def test_the_issue_cases_read_as_documented(command, args, expected):
    result = invoke(command, *args)
    assert result.exit_code == 2 and result.stderr.strip() == f"Error: {expected}"


SEEDED = sorted({name for name, flag, _ in NUMERIC if flag == "--seed"})


@pytest.mark.parametrize("name", SEEDED)
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_has_one_rule_in_every_command(name, seed):
    line = assert_refused(invoke(name, "--seed", seed), "--seed")
    assert line == f"Error: --seed must be in [0, 4294967295], got {seed}"


def test_check_options_accepts_edges_and_skips_none_and_flags():
    check_options({"seed": 0, "dropout": 0.0, "threshold": 1.0, "min_kendall": -1.0, "tau": None, "json_output": True})
    check_options({"seed": 2**32 - 1, "label_smoothing": 0.4999})
    with pytest.raises(OptionError, match=r"^label_smoothing= must be in \[0, 0.5\), got 0.5$") as raised:
        check_options({"label_smoothing": 0.5})  # the library names the keyword ...
    assert raised.value.as_flag() == "--label-smoothing must be in [0, 0.5), got 0.5"  # ... the CLI the flag
    assert isinstance(raised.value, ValueError)  # Python users catch it as the builtin it is
    with pytest.raises(PrefnoiseError, match="finite"):
        check_options({"unlisted_float": math.nan})  # finiteness applies to every float option
