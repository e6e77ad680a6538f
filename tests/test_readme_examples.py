"""The console examples of the README and of docs/*.md are produced by prefnoise as it is now
(docs/readme_examples.py); the README fits on a screen and every link in the manual resolves."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from contextlib import redirect_stdout
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


def test_a_console_block_left_open_is_an_error() -> None:
    lines = ["```console", "$ echo 1", "1", "", "Text.", "", "```console", "$ echo 2", "2", "```"]
    with pytest.raises(ValueError, match="line 1: a ```console block is not closed"):
        examples.parse_blocks(lines)


def test_every_page_parses() -> None:
    for page in examples.pages():
        blocks = examples.parse_blocks(page.read_text().split("\n"))
        assert all(block.commands or block.flag in {"setup-output", "slow"} for block in blocks), page.name


def test_comparison_masks_only_what_a_rerun_changes() -> None:
    shown = examples.normalise('400 rows → out/x.parquet in 0.05 s (8,654 rows/s) {"seconds": 0.052}')
    rerun = examples.normalise('400 rows → out/x.parquet in 1.30 s (2,001 rows/s) {"seconds": 1.3}')
    assert examples.same_output(shown, rerun)
    assert not examples.same_output("95 flipped", "76 flipped")  # counts are exact
    assert examples.same_output("agreement 0.7600", "agreement 0.7601")  # one unit in the last place
    assert not examples.same_output("agreement 0.7600", "agreement 0.7620")
    # a trained model's margins on another CPU: within 0.1 % of their value
    assert examples.same_output("│ -20.9307 │ 0.9912 │", "│ -20.9315 │ 0.9912 │")
    assert not examples.same_output("│ -20.9307 │", "│ -20.9557 │")  # 0.12 %
    assert examples.same_output('{"bias": 0.23216115681881483}', '{"bias": 0.2321610798489469}')  # JSON reprs
    assert not examples.same_output("rate 0.28", "rate 0.2800")  # printed precision is part of the output


def test_status_of_a_failed_command_reaches_echo(tmp_path: Path) -> None:
    outputs = examples.run_commands(["echo out; false", "echo $?"], tmp_path, {"PATH": "/usr/bin:/bin"})
    assert outputs == ["out", "1"]


def test_pages_are_the_readme_then_every_docs_page_in_reading_order() -> None:
    pages = [page.relative_to(ROOT).as_posix() for page in examples.pages()]
    assert pages[0] == "README.md"
    assert sorted(pages[1:]) == sorted(page.relative_to(ROOT).as_posix() for page in (ROOT / "docs").glob("*.md"))
    ordered = [f"docs/{name}.md" for name in examples.PAGE_ORDER]
    assert pages[1 : 1 + len(ordered)] == ordered  # every page named in PAGE_ORDER exists (a rename would not pass)
    assert pages.index("docs/split.md") < pages.index("docs/audit.md")  # audit's examples read split's outputs


def _scratch_checkout(root: Path, page: str) -> None:
    """A checkout with a README whose set-up block runs no prefnoise step, and one docs page."""
    (root / "docs").mkdir(parents=True)
    (root / "sample_data").mkdir()
    (root / "README.md").write_text("# x\n\n```bash\necho install\n```\n\n```console\n$ echo readme\nreadme\n```\n")
    (root / "docs" / "page.md").write_text(page)


def test_a_drifted_example_in_docs_is_reported_with_its_page_and_rewritten(tmp_path: Path) -> None:
    page = "# page\n\nText.\n\n```console\n$ echo 2 > two.txt; cat two.txt\n1\n$ cat two.txt\n2\n```\n"
    _scratch_checkout(tmp_path, page)
    problems = examples.check(verbose=False, root=tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("docs/page.md line 5, `echo 2 > two.txt; cat two.txt`:")
    assert "-1" in problems[0] and "+2" in problems[0]
    assert examples.check(write=True, verbose=False, root=tmp_path) == []
    assert (tmp_path / "docs" / "page.md").read_text() == (
        "# page\n\nText.\n\n```console\n$ echo 2 > two.txt; cat two.txt\n2\n$ cat two.txt\n2\n```\n"
    )
    assert examples.check(verbose=False, root=tmp_path) == []


def test_docs_pages_continue_the_readmes_scratch_directory(tmp_path: Path) -> None:
    _scratch_checkout(tmp_path, "```console\n$ cat made-by-readme.txt\nhello\n```\n")
    readme = (tmp_path / "README.md").read_text().replace("$ echo readme\nreadme", "$ echo hello > made-by-readme.txt")
    (tmp_path / "README.md").write_text(readme)
    assert examples.check(verbose=False, root=tmp_path) == []


def test_long_blocks_are_left_out_only_when_asked(tmp_path: Path) -> None:
    _scratch_checkout(tmp_path, "<!-- example: long -->\n```console\n$ echo long\nshort\n```\n")
    assert examples.check(verbose=False, long=False, root=tmp_path) == []
    assert len(examples.check(verbose=False, long=True, root=tmp_path)) == 1


def test_the_readme_fits_on_a_screen_and_keeps_its_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    bash_blocks = re.findall(r"^```bash\n(.*?)\n```$", readme, flags=re.S | re.M)
    assert bash_blocks[0].startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" "torch==2.13.0" && ')
    assert bash_blocks[0].endswith("&& .venv/bin/prefnoise rank-check out/scored.parquet")
    assert bash_blocks[1] == ".venv/bin/python -m pytest"  # .ci/run runs these two blocks as written


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (what looks like a link or heading there is code)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(page))


def test_github_anchor_follows_githubs_rules() -> None:
    assert github_anchor("Differences from TRL's RewardTrainer") == "differences-from-trls-rewardtrainer"
    assert github_anchor("Alignment (paper Sec. 5.2, scaled down)") == "alignment-paper-sec-52-scaled-down"
    assert github_anchor("`prefnoise corrupt IN OUT` — inject") == "prefnoise-corrupt-in-out--inject"


def test_every_relative_link_and_figure_of_the_manual_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):
                continue  # https:, mailto:
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", _prose(target), flags=re.M)
                if anchor not in {github_anchor(heading) for heading in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_index() -> None:
    linked = {link.partition("#")[0] for link in _links(ROOT / "docs" / "index.md")}
    pages = {page.name for page in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, pages - linked


def test_the_library_pages_python_examples_print_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "library.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        printed = io.StringIO()
        with redirect_stdout(printed):
            exec(compile(block, "docs/library.md", "exec"), {"__name__": "library_page"})
        lines = block.splitlines()
        claimed = [
            lines[i + 1].removeprefix("# ").strip()
            for i, line in enumerate(lines[:-1])
            if line.startswith("print(") and lines[i + 1].startswith("# ")
        ]
        assert claimed and printed.getvalue().splitlines() == claimed


@pytest.mark.slow
def test_readme_examples_match_a_fresh_run() -> None:
    # README.md and docs/*.md; the align example (a tiny LM trained twice) is left to `docs/readme_examples.py`
    problems = examples.check(write=False, verbose=False, long=False)
    assert not problems, "\n\n".join(problems) + "\n\nrerun: .venv/bin/python docs/readme_examples.py --write"
