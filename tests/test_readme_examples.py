"""The README's console examples are produced by prefnoise as it is now (docs/readme_examples.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "docs" / "readme_examples.py")
examples = importlib.util.module_from_spec(spec)
sys.modules["readme_examples"] = examples  # dataclasses look their module up
spec.loader.exec_module(examples)


def test_parse_splits_commands_outputs_and_continuations() -> None:
    lines = [
        "<!-- example: needs-shared -->",
        "```console",
        "$ prefnoise corrupt a b --rate 0.6",
        "Error: bad",
        "$ python -c \"print(1)",
        "print(2)\"",
        "1",
        "2",
        "$ echo $?",
        "0",
        "```",
    ]
    (block,) = examples.parse_blocks(lines)
    assert block.flag == "needs-shared"
    assert block.commands == ["prefnoise corrupt a b --rate 0.6", 'python -c "print(1)\nprint(2)"', "echo $?"]
    assert block.outputs == ["Error: bad", "1\n2", "0"]


def test_comparison_masks_only_what_a_rerun_changes() -> None:
    shown = examples.normalise('400 rows → out/x.parquet in 0.05 s (8,654 rows/s) {"seconds": 0.052}')
    rerun = examples.normalise('400 rows → out/x.parquet in 1.30 s (2,001 rows/s) {"seconds": 1.3}')
    assert examples.same_output(shown, rerun)
    assert not examples.same_output("95 flipped", "76 flipped")  # counts are exact
    assert examples.same_output("agreement 0.7600", "agreement 0.7601")  # one unit in the last place
    assert not examples.same_output("agreement 0.7600", "agreement 0.7620")


def test_status_of_a_failed_command_reaches_echo(tmp_path: Path) -> None:
    outputs = examples.run_commands(["echo out; false", "echo $?"], tmp_path, {"PATH": "/usr/bin:/bin"})
    assert outputs == ["out", "1"]


@pytest.mark.slow
def test_readme_examples_match_a_fresh_run() -> None:
    # the align example (a tiny LM trained twice) is left to `docs/readme_examples.py` to keep the suite short
    problems = examples.check(write=False, verbose=False, long=False)
    assert not problems, "\n\n".join(problems) + "\n\nrerun: .venv/bin/python docs/readme_examples.py --write"
