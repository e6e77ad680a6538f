"""The data package's shape: submodules in one import order, no CLI imports, open_input's warnings."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prefnoise.data import open_input
from prefnoise.errors import PrefnoiseWarning
from tests.cli_helpers import invoke
from tests.conftest import make_pairs

DATA = Path(__file__).resolve().parents[1] / "prefnoise" / "data"
# lowest first: a module may import only modules listed before it
ORDER = [
    "read_ahead", "nesting", "schema", "json_lines", "locate", "mapping", "provenance", "conversational", "canonical",
    "read", "write", "inputs",
]


def _package_imports(path: Path) -> set[str]:
    """The prefnoise.data submodules ``path`` imports at run time (type-checking-only imports aside)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefnoise.data."):
            names.add(node.module.split(".")[2])
    return names


def test_submodules_import_only_lower_ones_and_never_the_cli():
    modules = sorted(p.stem for p in DATA.glob("*.py") if p.stem != "__init__")
    assert modules == sorted(ORDER)
    for name in ORDER:
        source = (DATA / f"{name}.py").read_text()
        below = set(ORDER[: ORDER.index(name)])
        assert _package_imports(DATA / f"{name}.py") <= below, name
        assert "prefnoise.cli" not in source and "import typer" not in source and "rich" not in source, name
        assert len(source.splitlines()) <= 600, name


def test_the_data_layer_loads_without_typer_rich_or_the_cli():
    code = (
        "import sys, prefnoise.data\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('typer', 'rich') or m.startswith('prefnoise.cli')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def bad_history(tmp_path):
    source = tmp_path / "meta.parquet"
    pq.write_table(make_pairs(6).to_arrow().replace_schema_metadata({b"prefnoise": b"[1, 2]"}), source)
    return source


EXPECTED = "provenance history unreadable (the 'prefnoise' metadata is a JSON list, not an object); starting a new one"


def test_open_input_warns_through_the_callback_or_as_a_prefnoise_warning(bad_history):
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape when a callback is given
        source = open_input(str(bad_history), warn=said.append)
    assert said == [f"{bad_history}: {EXPECTED}"]
    assert source.history == []
    with pytest.warns(PrefnoiseWarning) as caught:
        open_input(str(bad_history))
    assert [str(w.message) for w in caught] == [f"{bad_history}: {EXPECTED}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_input(str(bad_history), warn_history=False)  # asked not to warn: silent


def test_the_cli_prints_the_warning_as_one_line(bad_history, tmp_path):
    done = invoke("corrupt", bad_history, tmp_path / "out.parquet", "--rate", "0.2")
    assert done.exit_code == 0, done.output
    assert done.stderr == f"Warning: {bad_history}: {EXPECTED}\n"
