"""The package's shape: layers that run one way (import-linter's contract in pyproject.toml), no import
cycles, no library module importing the CLI, every module in a layer, function-local imports with a reason."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp
import tomllib
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prefnoise"


def _layers() -> list[list[str]]:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [[name.strip() for name in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def test_the_layers_contract_holds():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0  # prints the broken chains if not


def test_every_top_level_module_sits_in_a_layer():
    named = {name for layer in _layers() for name in layer}
    present = {f"prefnoise.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {f"prefnoise.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert present - named == set(), "add these modules to a layer in pyproject.toml"
    assert named - present == set(), "the contract names modules that do not exist"


def test_no_library_module_imports_the_cli():
    graph = grimp.build_graph("prefnoise")
    importers = {m for m in graph.find_modules_that_directly_import("prefnoise.cli")}
    for module in graph.find_children("prefnoise.cli"):
        importers |= graph.find_modules_that_directly_import(module)
    assert {m for m in importers if not m.startswith("prefnoise.cli")} <= {"prefnoise.__main__"}


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start) & modules)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("prefnoise", exclude_type_checking_imports=True)  # annotations never run
    # the root package is a lazy facade (names resolved on first use), not a module other modules depend on
    modules = {m for m in graph.modules if m != "prefnoise"}
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from loop import b\n")
    (package / "b.py").write_text("def f():\n    from loop import a  # a function-local import is still an edge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("loop")
    assert _cycles(graph, {"loop.a", "loop.b"}) == [["loop.a", "loop.b"]]


def test_the_contract_fails_when_a_library_module_imports_the_cli(tmp_path, monkeypatch):
    package = tmp_path / "shaped"
    (package / "cli").mkdir(parents=True)
    for path in ("__init__.py", "cli/__init__.py"):
        (package / path).write_text("")
    (package / "cli" / "main.py").write_text("from shaped import lib\n")
    (package / "lib.py").write_text("from shaped.cli import main  # upward: the library must not do this\n")
    (tmp_path / "contract.toml").write_text(
        '[tool.importlinter]\nroot_package = "shaped"\n\n[[tool.importlinter.contracts]]\n'
        'name = "layers"\ntype = "layers"\nlayers = ["shaped.cli", "shaped.lib"]\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert lint_imports(config_filename="contract.toml", no_cache=True) == 1
    sys.modules.pop("shaped", None)
def _function_local_imports() -> list[tuple[str, int, str, bool]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    line, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                    name = inner.module if isinstance(inner, ast.ImportFrom) else inner.names[0].name
                    reason = "#" in line or above.startswith("#")
                    found.append((f"{path.relative_to(ROOT)}:{inner.lineno}", inner.lineno, name or "", reason))
    return found


def test_function_local_imports_say_why():
    missing = [where for where, _, _, reason in _function_local_imports() if not reason]
    assert missing == [], f"{len(missing)} function-local imports without a one-line reason: {missing[:20]}"


# --------------------------------------------------------------------------- sizes (docs/architecture.md)

MAX_FUNCTION_LINES = 80  # signature and docstring included: end_lineno - lineno + 1
MAX_MODULE_LINES = 600
# "path:function" or "path" -> why it may be longer; each one is listed in docs/architecture.md too.
SIZE_EXCEPTIONS: dict[str, str] = {}


def _oversized(package: Path) -> list[tuple[str, int]]:
    """(``path`` or ``path:function``, lines) of every module and function in ``package`` over the limits."""
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(package.parent).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((f"{name}:{node.name}", lines))
    return found


def test_no_function_over_80_lines_and_no_module_over_600():
    assert [(where, n) for where, n in _oversized(PACKAGE) if where not in SIZE_EXCEPTIONS] == []


def test_every_size_exception_is_still_needed_and_documented():
    oversized = {where for where, _ in _oversized(PACKAGE)}
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for where, reason in SIZE_EXCEPTIONS.items():
        assert reason and where in oversized, f"{where} is within the limits now: drop its exception"
        assert where.split(":")[-1] in architecture, f"list {where} with its reason in docs/architecture.md"


def test_the_size_check_finds_a_long_function_and_a_long_module(tmp_path):
    package = tmp_path / "big"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(79))  # 79 lines + the def line: exactly 80
    (package / "fits.py").write_text(f"def at_the_limit():\n{body}")
    (package / "long.py").write_text(f"def over_it():\n{body}    return x0\n" + "\n" * 520)
    assert _oversized(package) == [("big/long.py", 601), ("big/long.py:over_it", 81)]
