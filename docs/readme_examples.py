"""Run the console examples of the README and of docs/*.md and check (or rewrite) the output they show.

    .venv/bin/python docs/readme_examples.py            # check: exit 1 with a diff when an example drifted
    .venv/bin/python docs/readme_examples.py --write    # rerun them and rewrite the pages' outputs

Each ```console block whose lines start with ``$ `` is run top to bottom in one scratch directory
(``sample_data`` linked in, ``../shared`` linked when it is beside this checkout), after the main job
of the README's first ```bash block, exactly as a reader would run them: the README first, then the
pages of docs/ in ``PAGE_ORDER`` (a page may read what an earlier one wrote), then any other docs page by
name. Output is stdout and stderr together, as a terminal shows it. Before comparing, only what a rerun
legitimately changes is masked (durations, throughputs, timestamps, the scratch path); every count, rate
and figure must match (counts exactly; decimals to within one unit in the last printed place or 0.1 % of
their value, for CPU-to-CPU rounding). The examples run with ``MKL_CBWR=COMPATIBLE`` and
``ATEN_CPU_CAPABILITY=default``, the same float arithmetic on every x86 CPU.

A comment line just before a block controls it:
``<!-- example: setup-output -->`` the block shows the main job's output from its second command on;
``<!-- example: slow -->`` the block is not run (it names a long job; its figures name their command);
``<!-- example: long -->`` the block runs here but not in the test suite (kept under its time budget);
``<!-- example: needs-shared -->`` the block reads ../shared/data/real and is skipped without it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# the order in which the docs pages' examples run, after the README's (later pages use earlier pages' files)
PAGE_ORDER = (
    "data",
    "corrupt",
    "inspect",
    "fit-reward",
    "score",
    "split",
    "rank-check",
    "align",
    "audit",
    "reproduce",
    "results",
    "trl",
)
MARK = "@@@prefnoise-readme-example@@@"

VOLATILE = [
    (re.compile(r"\b\d+(\.\d+)? s\b"), "<T> s"),  # durations: "in 0.05 s"
    (re.compile(r"\(\d[\d,]* (rows|pairs|tokens)/s\)"), r"(<N> \1/s)"),
    (re.compile(r'"(seconds|rows_per_second|duration_s|tokens_per_second)": [-+0-9.e]+'), r'"\1": <N>'),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?( UTC|Z|[+-]\d\d:?\d\d)?"), "<TIME>"),
]
NUMBER = re.compile(r"-?\d+\.\d+|-?\d[\d,]*")
# Decimals may differ by this fraction: 50 epochs of training turn the CPU's float round-off (its vector width,
# the matrix kernels MKL or OpenBLAS pick for it) into a 4th-decimal margin or a 7th-digit JSON float
RELATIVE = 1e-3
REPR_PLACES = 6  # decimals printed this long are full-precision floats (JSON), whose length varies


@dataclass
class Block:
    """One ```console block: its line span in its page, its flag, and its commands with their output."""

    start: int  # index of the ```console line
    end: int  # index of the closing ``` line
    flag: str | None
    commands: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _complete(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return False
    return not command.endswith("\\")


def parse_blocks(lines: list[str]) -> list[Block]:
    """A page's console blocks, each split into ``$`` commands and the output shown under each."""
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index] != "```console":
            index += 1
            continue
        flag = None
        if index > 0 and (found := re.match(r"<!-- example: ([\w-]+) -->", lines[index - 1])):
            flag = found.group(1)
        end = lines.index("```", index + 1)
        block = Block(index, end, flag)
        body = lines[index + 1 : end]
        if any(line.startswith("```") for line in body):  # a block left open swallows the next one
            raise ValueError(f"line {index + 1}: a ```console block is not closed before the next fence")
        position = 0
        if flag == "setup-output":
            block.outputs.append("\n".join(body))
        while position < len(body) and flag != "setup-output":
            line = body[position]
            if not line.startswith("$ "):
                position += 1  # text before the first command
                continue
            command = line[2:]
            position += 1
            while not _complete(command) and position < len(body):
                command += "\n" + body[position]
                position += 1
            output = []
            while position < len(body) and not body[position].startswith("$ "):
                output.append(body[position])
                position += 1
            block.commands.append(command)
            block.outputs.append("\n".join(output))
        blocks.append(block)
        index = end + 1
    return blocks


def setup_commands(readme: str) -> list[str]:
    """The prefnoise steps of the README's first ```bash block (the install steps are left out)."""
    match = re.search(r"^```bash\n(.*?)\n```", readme, flags=re.S | re.M)
    if match is None:
        raise SystemExit("README: no ```bash set-up block")
    steps = [step.strip() for step in match.group(1).split("&&")]
    return [step.removeprefix(".venv/bin/") for step in steps if step.startswith(".venv/bin/prefnoise")]


def run_commands(commands: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """Run ``commands`` in one bash, in order; the output of each (stdout and stderr interleaved)."""
    script = []
    for command in commands:
        script.append(command)
        # the marker keeps $? for a following `echo $?`
        script.append(f"__status=$?; printf '\\n{MARK}\\n'; (exit $__status)")
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    parts = result.stdout.split(f"\n{MARK}\n")
    return [part.strip("\n") for part in parts[: len(commands)]]


def normalise(text: str, scratch: Path | None = None) -> str:
    """``text`` with what a rerun may change masked."""
    if scratch is not None:
        text = text.replace(str(scratch), "<SCRATCH>")
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def same_output(shown: str, produced: str) -> bool:
    """True when the texts agree outside masked fields: integers exactly; decimals within one unit in the last
    printed place, or within ``RELATIVE`` of each other (a trained model's round-off on another CPU)."""
    shown_numbers, produced_numbers = NUMBER.findall(shown), NUMBER.findall(produced)
    if NUMBER.sub("#", shown) != NUMBER.sub("#", produced) or len(shown_numbers) != len(produced_numbers):
        return False
    for a, b in zip(shown_numbers, produced_numbers):
        if "." not in a or "." not in b:
            if a != b:
                return False
            continue
        places, other_places = len(a.split(".")[1]), len(b.split(".")[1])
        if places != other_places and min(places, other_places) < REPR_PLACES:
            return False
        difference = abs(float(a) - float(b))
        if difference > 1.001 * 10**-places and difference > RELATIVE * max(abs(float(a)), abs(float(b))):
            return False
    return True


def pages(root: Path = ROOT) -> list[Path]:
    """The pages whose examples run, in order: README.md, docs/ pages in ``PAGE_ORDER``, the others by name."""
    docs = sorted((root / "docs").glob("*.md"))
    rank = {name: index for index, name in enumerate(PAGE_ORDER)}
    docs.sort(key=lambda page: (rank.get(page.stem, len(rank)), page.name))
    return [root / "README.md", *docs]


def scratch_environment(base: Path, root: Path = ROOT) -> tuple[Path, dict[str, str]]:
    """A scratch working directory laid out like the checkout, and the environment to run in."""
    work = base / "work"
    work.mkdir()
    (work / "sample_data").symlink_to(root / "sample_data")
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {"PYTHONUNBUFFERED": "1", "COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1", "PREFNOISE_CACHE_DIR": str(base)}
    )
    env.pop("FORCE_COLOR", None)
    # the same float arithmetic on every x86 CPU: MKL's default kernels (and ATen's vector width) depend on the
    # CPU, and a model trained for 50 epochs turns that round-off into a different 4th decimal
    env.update({"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"})
    return work, env


def rewrite_outputs(lines: list[str], blocks: list[Block]) -> str:
    """The page ``lines`` with each block's body rebuilt from its commands and (rerun) outputs."""
    lines = list(lines)
    for block in reversed(blocks):
        if block.flag == "slow":
            continue
        if block.flag == "setup-output":
            body = block.outputs[0].split("\n")
        else:
            body = []
            for command, output in zip(block.commands, block.outputs):
                body.append(f"$ {command}")
                if output:
                    body.extend(output.split("\n"))
        lines[block.start + 1 : block.end] = body
    return "\n".join(lines)


def check(write: bool = False, verbose: bool = True, long: bool = True, root: Path = ROOT) -> list[str]:
    """Run every example of the README and docs/*.md (``long`` ones too unless told not to); return the
    drifted ones as diffs, each naming its page and line.

    With ``write`` the pages' outputs are rewritten from the rerun instead.
    """
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prefnoise-readme-") as tmp:
        work, env = scratch_environment(Path(tmp), root)
        setup_outputs = run_commands(setup_commands((root / "README.md").read_text()), work, env)
        for page in pages(root):
            name = page.relative_to(root).as_posix()
            lines = page.read_text().split("\n")
            blocks = parse_blocks(lines)
            for block in blocks:
                if block.flag == "slow" or (block.flag == "needs-shared" and not SHARED.is_dir()):
                    continue
                if block.flag == "long" and not long:
                    continue
                started = time.perf_counter()
                if block.flag == "setup-output":
                    produced = ["\n".join(setup_outputs[1:])]
                else:
                    produced = run_commands(block.commands, work, env)
                if verbose:
                    seconds = time.perf_counter() - started
                    print(f"{name} line {block.start + 1}: {len(block.commands) or 1} command(s), {seconds:.1f} s",
                          file=sys.stderr)
                for index, (shown, new) in enumerate(zip(block.outputs, produced)):
                    if same_output(normalise(shown), normalise(new, work)):
                        continue
                    if write:
                        rerun = new.replace(str(work), ".")
                        block.outputs[index] = "\n".join(line.rstrip() for line in rerun.splitlines())
                        continue
                    label = block.commands[index].splitlines()[0] if block.commands else "set-up output"
                    diff = difflib.unified_diff(
                        normalise(shown).splitlines(), normalise(new, work).splitlines(), name, "rerun", lineterm=""
                    )
                    problems.append(f"{name} line {block.start + 1}, `{label}`:\n" + "\n".join(diff))
            if write and blocks:
                page.write_text(rewrite_outputs(lines, blocks))
    return problems


def main() -> int:
    """Command-line entry: check by default, ``--write`` to rewrite the pages' outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the example outputs of README.md and docs/")
    args = parser.parse_args()
    problems = check(write=args.write)
    for problem in problems:
        print(problem, end="\n\n")
    if problems:
        print(f"{len(problems)} example(s) drifted; rerun with --write after checking them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
