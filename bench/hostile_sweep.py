"""A hostile sweep (issue 22): real `python -m prefnoise` processes against malformed inputs, hostile output
paths, options at their bounds, signals, concurrent runs, damaged model directories and odd environments.

    nice -n 10 python bench/hostile_sweep.py [--jobs 2] [--only SUBSTRING] [--keep DIR]

Every case is checked against the project's rules:
  - exit code in the case's expected set (default {0, 2}; 1 only for a failed gate; 3 is always a failure);
  - on exit 2 (or 3) stderr is one line "Error: ..." (Notes/Warnings aside), never a traceback;
  - no file under the inputs (and nothing a case marks as the user's) changed: sha256 before and after;
  - no temporary file, lock or result left behind (beside the outputs or in the case's own TMPDIR).
It prints one line per failing case and a summary; the exit status is the number of failures (capped at 100).
Not part of the test suite: it takes minutes (each case starts Python and torch).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LEFTOVER_MARKS = (".tmp-", "prefnoise-lock", "prefnoise-result", ".partial")
# Not prefnoise's: torch makes its (empty) compile-cache directory in TMPDIR when transformers loads a model.
LIBRARY_TMP = ("torchinductor_",)


@dataclass
class Case:
    """One hostile run: argv after ``prefnoise``; expected exit codes; what it may leave; how to start it."""

    name: str
    argv: list[str]
    expect: frozenset[int] = frozenset({0, 2})
    env: dict[str, str | None] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # gets the case's own directory (outputs go there)
    protect: list[str] = field(default_factory=list)  # files (relative to the case dir) that are the user's
    kill: tuple[float, int] | None = None  # (seconds after start, signal)
    twin: bool = False  # start the same command twice at once
    cwd: str | None = None  # relative to the case dir
    stdin: bytes | None = None
    debug: bool = False
    timeout: float = 600  # under a load of 30 on 2 cores importing torch alone took 90 s


def sha(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (links followed only when they point to files)."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode):
                found[str(path)] = sha(path)
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary files, locks and result files under ``root``."""
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            if any(mark in name for mark in LEFTOVER_MARKS):
                bad.append(str(Path(dirpath, name).relative_to(root)))
    return bad


# ---------------------------------------------------------------- the workspace: data and models


def write_text(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def make_workspace(ws: Path) -> None:
    """Inputs (tables of every format and flaw) and models (tiny LM, reward models, damaged copies)."""
    import polars as pl

    sys.path.insert(0, str(ROOT))
    from prefnoise.experiments.tiny_lm import make_tiny_causal_lm, pattern_pairs, pattern_texts

    inp = ws / "inputs"
    inp.mkdir(parents=True)
    sample = pl.read_parquet(ROOT / "sample_data" / "pairs.parquet")
    sample.write_parquet(inp / "pairs.parquet")
    flat = sample.drop("chosen_features", "rejected_features")
    flat.write_csv(inp / "pairs.csv")
    flat.write_ndjson(inp / "pairs.jsonl")
    votes = ["chosen", "rejected", "tie", None]
    rng = random.Random(0)
    ann = flat.with_columns(
        pl.Series("ann1", [rng.choice(votes[:3]) for _ in range(flat.height)]),
        pl.Series("ann2", [rng.choice(votes) for _ in range(flat.height)]),
        pl.Series("gold", [rng.choice(votes[:2]) if i % 4 == 0 else None for i in range(flat.height)]),
        pl.Series("margin", [rng.gauss(0, 1) for _ in range(flat.height)]),
    )
    ann.write_parquet(inp / "annotated.parquet")
    pl.DataFrame({"pair_id": flat["pair_id"].to_list()[:50] * 2,
                  "annotator": ["a"] * 50 + ["b"] * 50,
                  "vote": [rng.choice(votes[:3]) for _ in range(100)]}).write_csv(inp / "votes.csv")
    pattern_pairs(48, seed=3).write_parquet(inp / "pattern.parquet")
    big = pl.concat([flat] * 500).with_columns(pl.Series("pair_id", [f"p{i}" for i in range(flat.height * 500)]))
    big.write_parquet(inp / "big.parquet")
    hostile_tables(inp, flat)
    models = ws / "models"
    make_tiny_causal_lm(models / "lm", pattern_texts())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["fit-reward", str(inp / "pairs.parquet"), "--out", str(models / "rm_mlp"), "--epochs", "2",
                  "--hidden", "8"],
                 ["fit-reward", str(inp / "pattern.parquet"), "--model", str(models / "lm"), "--out",
                  str(models / "rm_tf"), "--epochs", "1", "--max-length", "32", "--device", "cpu"]):
        subprocess.run([PY, "-m", "prefnoise", "-q", *argv], check=True, env=env)
    damaged_models(models)


def hostile_tables(inp: Path, flat) -> None:
    """Tables with one flaw each."""
    header = ",".join(flat.columns)
    csv_text = (inp / "pairs.csv").read_text()
    write_text(inp / "empty.csv", "")
    write_text(inp / "empty.jsonl", "")
    write_text(inp / "empty.parquet", b"")
    write_text(inp / "header_only.csv", header + "\n")
    write_text(inp / "bom.csv", "\ufeff" + csv_text)
    write_text(inp / "crlf.csv", csv_text.replace("\n", "\r\n"))
    jsonl = (inp / "pairs.jsonl").read_text()
    write_text(inp / "bom.jsonl", "\ufeff" + jsonl)
    write_text(inp / "crlf.jsonl", jsonl.replace("\n", "\r\n"))
    lines = jsonl.splitlines()
    write_text(inp / "mixed_types.jsonl", "\n".join(lines[:5] + [lines[5].replace('"prompt":"', '"prompt":1234,"x":"')]
                                                     + lines[6:]) + "\n")
    write_text(inp / "prompt_int.jsonl", '{"prompt": 5, "chosen": "a", "rejected": "b"}\n' * 3)
    write_text(inp / "chosen_list.jsonl", '{"prompt": "p", "chosen": ["a"], "rejected": "b"}\n' * 3)
    write_text(inp / "chosen_dict.jsonl", '{"prompt": "p", "chosen": {"x": 1}, "rejected": "b"}\n' * 3)
    write_text(inp / "array_line.jsonl", jsonl + "[1, 2, 3]\n")
    write_text(inp / "null_line.jsonl", jsonl + "null\n")
    write_text(inp / "garbage_tail.jsonl", jsonl + "{not json\n")
    write_text(inp / "surrogate.jsonl", '{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}\n' * 3)
    write_text(inp / "nul_bytes.csv", header + "\n" + csv_text.splitlines()[1].replace("How", "H\x00ow") + "\n")
    write_text(inp / "unbalanced.csv", header + '\n"abc,def,ghi\n')
    write_text(inp / "garbage.parquet", os.urandom(4096))
    write_text(inp / "garbage.jsonl", os.urandom(4096))
    write_text(inp / "latin1.csv", "prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"))
    write_text(inp / "huge_cell.jsonl", '{"prompt": "' + "x" * 30_000_000 + '", "chosen": "a", "rejected": "b"}\n'
               + '{"prompt": "q", "chosen": "c", "rejected": "d"}\n' * 20)
    write_text(inp / "long_line_no_newline.jsonl", '{"prompt": "' + "y" * 5_000_000 + '"')
    scores = lambda c, r: "\n".join(  # noqa: E731
        f'{{"pair_id": "p{i}", "prompt": "q{i}", "chosen": "a{i}", "rejected": "b{i}", "chosen_score": {c}, '
        f'"rejected_score": {r}}}' for i in range(30)) + "\n"
    write_text(inp / "nan_scores.jsonl", scores("NaN", "0.5"))
    write_text(inp / "inf_scores.jsonl", scores("Infinity", "-Infinity"))
    write_text(inp / "string_scores.jsonl", scores('"high"', '"low"'))
    write_text(inp / "nan_scores.csv", "pair_id,prompt,chosen,rejected,chosen_score,rejected_score\n" +
               "".join(f"p{i},q{i},a{i},b{i},{'nan' if i % 3 else 'inf'},{i}\n" for i in range(30)))
    write_text(inp / "dup_ids.csv", "pair_id,prompt,chosen,rejected,chosen_score,rejected_score\n" +
               "".join(f"same,q{i},a{i},b{i},{i},{-i}\n" for i in range(30)))
    write_text(inp / "null_ids.csv", "pair_id,prompt,chosen,rejected,chosen_score,rejected_score\n" +
               "".join(f"{'' if i % 2 else f'p{i}'},q{i},a{i},b{i},{i},{-i}\n" for i in range(30)))
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    write_text(inp / "unicode_ids.csv", "pair_id,prompt,chosen,rejected,chosen_score,rejected_score\n" +
               "".join(f"{nfc if i % 2 else nfd}{i // 2},q{i},a{i},b{i},{i},{-i}\n" for i in range(30)))
    write_text(inp / "nan_votes.jsonl", "".join(
        f'{{"pair_id": "p{i}", "prompt": "q{i}", "chosen": "a{i}", "rejected": "b{i}", "ann1": {v}, "ann2": {w}}}\n'
        for i, (v, w) in enumerate([("NaN", "1")] * 5 + [("1", "-1")] * 20 + [("Infinity", "0")] * 5)))
    write_text(inp / "float_votes.csv", "pair_id,prompt,chosen,rejected,ann1,ann2\n" +
               "".join(f"p{i},q{i},a{i},b{i},{0.5 if i == 7 else 1},{-1 if i % 2 else 1}\n" for i in range(30)))
    write_text(inp / "bad_votes.csv", "pair_id,annotator,vote\np0,a,maybe\n")
    write_text(inp / "votes_unknown_pair.csv", "pair_id,annotator,vote\nnope,a,chosen\n")
    write_text(inp / "votes_nan.csv", "pair_id,annotator,vote\n" + "".join(
        f"{pid},a,{'nan' if k == 3 else 1}\n" for k, pid in enumerate(flat["pair_id"].to_list()[:20])))
    write_text(inp / "wide.csv", ",".join(f"c{i}" for i in range(3000)) + "\n" + ",".join("1" * 3000) + "\n")
    write_text(inp / "only_newlines.jsonl", "\n\n\n\n")
    write_text(inp / "deep.jsonl", '{"prompt": ' + "[" * 3000 + "]" * 3000 + ', "chosen": "a", "rejected": "b"}\n')
    write_text(inp / "dup_columns.csv", "prompt,prompt,chosen,rejected\na,b,c,d\n")
    write_text(inp / "empty_column_name.csv", "prompt,,chosen,rejected\na,x,c,d\n")
    write_text(inp / "same_responses.csv", "prompt,chosen,rejected\n" + "".join(f"q{i},a,a\n" for i in range(20)))
    write_text(inp / "empty_strings.csv", "prompt,chosen,rejected\n" + "".join(f'q{i},"",b\n' for i in range(20)))
    write_text(inp / "directory_not_table", b"")
    (inp / "a_directory.parquet").mkdir()
    os.mkfifo(inp / "fifo.jsonl")  # nobody writes: a reader must not hang forever (cases give a writer)
    (inp / "dangling.parquet").symlink_to(inp / "does_not_exist.parquet")
    (inp / "link_to_pairs.parquet").symlink_to(inp / "pairs.parquet")


def damaged_models(models: Path) -> None:
    """Copies of the transformer reward model and the LM, each broken one way."""
    def copy(src: str, name: str) -> Path:
        dest = models / name
        shutil.copytree(models / src, dest)
        return dest

    weights = "model.safetensors"
    for base in ("rm_tf", "lm"):
        d = copy(base, f"{base}_truncated")
        data = (d / weights).read_bytes()
        (d / weights).write_bytes(data[: len(data) // 2])
        d = copy(base, f"{base}_config_lies")
        text = (d / "config.json").read_text()
        (d / "config.json").write_text(text.replace('"n_embd": 32', '"n_embd": 64'))
        d = copy(base, f"{base}_config_broken")
        (d / "config.json").write_text("{ not json")
        d = copy(base, f"{base}_no_tokenizer")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt"):
            (d / name).unlink(missing_ok=True)
        d = copy(base, f"{base}_header_huge")
        data = (d / weights).read_bytes()
        (d / weights).write_bytes((10**15).to_bytes(8, "little") + data[8:])
        d = copy(base, f"{base}_no_weights")
        (d / weights).unlink()
        d = copy(base, f"{base}_remote_code")
        text = (d / "config.json").read_text()
        (d / "config.json").write_text(text.replace("{", '{"auto_map": {"AutoModel": "evil.Model", '
                                                        '"AutoModelForCausalLM": "evil.Model"}, ', 1))
        d = copy(base, f"{base}_config_dir")
        (d / "config.json").unlink()
        (d / "config.json").mkdir()
        d = copy(base, f"{base}_pickle")
        (d / weights).unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
        d = copy(base, f"{base}_huge_vocab")
        text = (d / "config.json").read_text()
        import re

        (d / "config.json").write_text(re.sub(r'"vocab_size": \d+', '"vocab_size": 40000000000', text))
    d = copy("rm_mlp", "rm_mlp_config_garbage")
    (d / "reward_config.json").write_text('{"backend": "mlp", "hidden": "many"}')
    d = copy("rm_mlp", "rm_mlp_no_weights")
    for path in d.iterdir():
        if path.suffix in (".safetensors", ".pt"):
            path.unlink()
    (models / "empty_dir").mkdir()
    write_text(models / "a_file", "not a model")


# ---------------------------------------------------------------- the cases


def cases(ws: Path) -> list[Case]:
    """Every case of the sweep."""
    return (input_cases(ws) + output_cases(ws) + option_cases(ws) + model_cases(ws) + signal_cases(ws)
            + concurrency_cases(ws) + environment_cases(ws) + audit_cases(ws) + train_cases(ws))


def input_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    tables = ["empty.csv", "empty.jsonl", "empty.parquet", "header_only.csv", "bom.csv", "crlf.csv", "bom.jsonl",
              "crlf.jsonl", "mixed_types.jsonl", "prompt_int.jsonl", "chosen_list.jsonl", "chosen_dict.jsonl",
              "array_line.jsonl", "null_line.jsonl", "garbage_tail.jsonl", "surrogate.jsonl", "nul_bytes.csv",
              "unbalanced.csv", "garbage.parquet", "garbage.jsonl", "latin1.csv", "huge_cell.jsonl",
              "long_line_no_newline.jsonl", "nan_scores.jsonl", "inf_scores.jsonl", "string_scores.jsonl",
              "nan_scores.csv", "dup_ids.csv", "null_ids.csv", "unicode_ids.csv", "wide.csv", "only_newlines.jsonl",
              "deep.jsonl", "dup_columns.csv", "empty_column_name.csv", "same_responses.csv", "empty_strings.csv",
              "directory_not_table", "a_directory.parquet", "dangling.parquet"]
    out = []
    for k, table in enumerate(tables):
        src = str(inp / table)
        out.append(Case(f"corrupt {table}", ["corrupt", src, "out.parquet", "--rate", "0.2"]))
        if k % 4 == 0:
            out.append(Case(f"split {table}", ["split", src, "train.parquet", "test.parquet"]))
        if k % 2 == 1:
            out.append(Case(f"inspect --json {table}", ["inspect", "--json", src]))
        if "score" in table or table.endswith("ids.csv"):
            out.append(Case(f"rank-check {table}", ["rank-check", src, "--pred", "score", "--bootstrap", "50"],
                            expect=frozenset({0, 1, 2})))
            out.append(Case(f"audit --reward-col {table}", ["audit", src, "--reward-col", "score", "--bootstrap",
                                                               "20", "--out", "a.parquet"]))
    for table in ("nan_scores.jsonl", "dup_ids.csv", "unicode_ids.csv", "bom.csv", "crlf.jsonl"):
        out.append(Case(f"score mlp {table}", ["score", str(ws / "models" / "rm_tf"), str(inp / table),
                                               "o.parquet", "--device", "cpu"]))
    out.append(Case("corrupt from a FIFO with a writer", ["corrupt", str(inp / "fifo.jsonl"), "o.parquet", "--rate",
                                                         "0.1"], setup=fifo_writer(inp / "fifo.jsonl",
                                                                                   inp / "pairs.jsonl")))
    out.append(Case("corrupt stdin garbage", ["corrupt", "-", "o.parquet", "--rate", "0.1"], stdin=os.urandom(2000)))
    out.append(Case("corrupt stdin empty", ["corrupt", "-", "o.parquet", "--rate", "0.1"], stdin=b""))
    out.append(Case("inspect stdin jsonl", ["inspect", "-"], stdin=(inp / "pairs.jsonl").read_bytes(),
                    expect=frozenset({0})))
    out.append(Case("corrupt --chosen-col missing", ["corrupt", str(inp / "pairs.csv"), "o.parquet", "--rate", "0.1",
                                                     "--chosen-col", "nope"], expect=frozenset({2})))
    out.append(Case("corrupt --chosen-col dotted into string", ["corrupt", str(inp / "pairs.csv"), "o.parquet",
                                                                "--rate", "0.1", "--chosen-col", "chosen.x.y"],
                    expect=frozenset({2})))
    out.append(Case("corrupt asymmetric --by column:missing", ["corrupt", str(inp / "pairs.csv"), "o.parquet",
                                                               "--noise", "asymmetric", "--rate-pos", "0.1",
                                                               "--rate-neg", "0.2", "--by", "column:nope"],
                    expect=frozenset({2})))
    out.append(Case("corrupt bt with nan scores", ["corrupt", str(inp / "nan_scores.jsonl"), "o.parquet", "--noise",
                                                   "bt", "--temperature", "1"]))
    out.append(Case("corrupt bt with inf scores", ["corrupt", str(inp / "inf_scores.jsonl"), "o.parquet", "--noise",
                                                   "bt", "--temperature", "1"]))
    return out


def fifo_writer(fifo: Path, source: Path) -> Callable[[Path], None]:
    def setup(_: Path) -> None:
        import threading

        def write() -> None:
            try:
                with open(fifo, "wb") as handle:
                    handle.write(source.read_bytes())
            except OSError:
                pass

        threading.Thread(target=write, daemon=True).start()
    return setup


def output_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    src = str(inp / "pairs.parquet")
    corrupt = lambda out, *extra: ["corrupt", src, out, "--rate", "0.1", *extra]  # noqa: E731

    def user_file(name: str, content: str = "user data\n") -> Callable[[Path], None]:
        return lambda d: write_text(d / name, content)

    def user_dir(name: str) -> Callable[[Path], None]:
        return lambda d: write_text(d / name / "keep.txt", "mine\n")

    def fifo(name: str) -> Callable[[Path], None]:
        return lambda d: os.mkfifo(d / name)

    def link(name: str, target: str | Path) -> Callable[[Path], None]:
        return lambda d: (d / name).symlink_to(target)

    def hardlink_to_input(name: str) -> Callable[[Path], None]:
        return lambda d: os.link(inp / "pairs.csv", d / name)

    cases_ = [
        Case("corrupt OUT is a user's directory", corrupt("dir"), setup=user_dir("dir"), protect=["dir/keep.txt"],
             expect=frozenset({2})),
        Case("corrupt OUT is a user's file", corrupt("o.parquet"), setup=user_file("o.parquet"), protect=["o.parquet"],
             expect=frozenset({2})),
        Case("corrupt OUT user's file --overwrite", corrupt("o.parquet", "--overwrite"), setup=user_file("o.parquet"),
             protect=["o.parquet"], expect=frozenset({2})),
        Case("corrupt OUT is a FIFO", corrupt("o.parquet"), setup=fifo("o.parquet"), expect=frozenset({2})),
        Case("corrupt OUT is /dev/null", corrupt("/dev/null"), expect=frozenset({0, 2})),
        Case("corrupt OUT is /dev/full", corrupt("/dev/full"), expect=frozenset({2})),
        Case("corrupt OUT .csv is /dev/zero", corrupt("/dev/zero"), expect=frozenset({2})),
        Case("corrupt OUT == IN", corrupt(src), expect=frozenset({2})),
        Case("corrupt OUT == IN via ../", corrupt(str(inp / ".." / "inputs" / "pairs.parquet")), expect=frozenset({2})),
        Case("corrupt OUT == IN via //", corrupt(str(inp).replace("/inputs", "//inputs") + "//pairs.parquet"),
             expect=frozenset({2})),
        Case("corrupt OUT == IN via ./ from its dir", ["corrupt", "pairs.parquet", "./pairs.parquet", "--rate", "0.1"],
             cwd=str(inp), expect=frozenset({2})),
        Case("corrupt OUT symlink to IN", corrupt("ln.parquet"), setup=link("ln.parquet", inp / "pairs.parquet"),
             expect=frozenset({2})),
        Case("corrupt OUT symlink to IN --overwrite", corrupt("ln.parquet", "--overwrite"),
             setup=link("ln.parquet", inp / "pairs.parquet"), expect=frozenset({2})),
        Case("corrupt IN via symlink, OUT the target", ["corrupt", str(inp / "link_to_pairs.parquet"), src, "--rate",
                                                        "0.1", "--overwrite"], expect=frozenset({2})),
        Case("corrupt csv OUT hardlink to IN", ["corrupt", str(inp / "pairs.csv"), "h.csv", "--rate", "0.1",
                                                "--overwrite"], setup=hardlink_to_input("h.csv"),
             expect=frozenset({2})),
        Case("corrupt IN hardlink, OUT the original", ["corrupt", "h.csv", str(inp / "pairs.csv"), "--rate", "0.1",
                                                       "--overwrite"], setup=hardlink_to_input("h.csv"),
             protect=["h.csv"], expect=frozenset({2})),
        Case("corrupt OUT dangling symlink", corrupt("d.parquet"), setup=link("d.parquet", "/nonexistent/x.parquet"),
             expect=frozenset({2})),
        Case("corrupt OUT symlink to a user's file elsewhere", corrupt("l.parquet"),
             setup=lambda d: (write_text(d / "user.parquet", "mine"), (d / "l.parquet").symlink_to(d / "user.parquet")),
             protect=["user.parquet"], expect=frozenset({2})),
        Case("corrupt OUT in a missing directory", corrupt("no/such/dir/o.parquet"), expect=frozenset({0, 2})),
        Case("corrupt OUT in read-only /sys", corrupt("/sys/o.parquet"), expect=frozenset({2})),
        Case("corrupt OUT in /proc", corrupt("/proc/o.parquet"), expect=frozenset({2})),
        Case("fit-reward --out in read-only /sys", ["fit-reward", src, "--out", "/sys/rm", "--epochs", "1"],
             expect=frozenset({2})),
        Case("corrupt OUT name 300 chars", corrupt("x" * 300 + ".parquet"), expect=frozenset({2})),
        Case("corrupt OUT name with newline", corrupt("a\nb.parquet"), expect=frozenset({0, 2})),
        Case("corrupt OUT unknown extension", corrupt("o.xlsx"), expect=frozenset({0, 2})),
        Case("corrupt OUT is empty string", corrupt(""), expect=frozenset({2})),
        Case("corrupt OUT trailing slash", corrupt("newdir/"), expect=frozenset({0, 2})),
        Case("corrupt OUT stdout -", corrupt("-"), expect=frozenset({0})),
        Case("split TRAIN == TEST", ["split", src, "t.parquet", "t.parquet"], expect=frozenset({2})),
        Case("split TRAIN == TEST via ./", ["split", src, "t.parquet", "./t.parquet"], expect=frozenset({2})),
        Case("split TEST == IN", ["split", src, "t.parquet", src], expect=frozenset({2})),
        Case("split TRAIN symlink to TEST", ["split", src, "a.parquet", "b.parquet"],
             setup=link("a.parquet", "b.parquet"), expect=frozenset({2})),
        Case("score OUT == DATA", ["score", str(ws / "models" / "rm_mlp"), str(inp / "pairs.parquet"), src],
             expect=frozenset({2})),
        Case("score OUT inside the model dir", ["score", str(ws / "models" / "rm_mlp"), src,
                                                str(ws / "models" / "rm_mlp" / "model.safetensors"), "--overwrite"],
             expect=frozenset({2})),
        Case("audit --out == DATA", ["audit", str(inp / "annotated.parquet"), "--reward-col", "score", "--out",
                                     str(inp / "annotated.parquet"), "--bootstrap", "10"], expect=frozenset({2})),
        Case("rank-check --plot == DATA", ["rank-check", str(inp / "pairs.parquet"), "--pred", "score", "--plot",
                                           src], expect=frozenset({2})),
        Case("rank-check --plot is a user's dir", ["rank-check", src, "--pred", "score", "--plot", "dir"],
             setup=user_dir("dir"), protect=["dir/keep.txt"], expect=frozenset({2})),
        Case("fit-reward --out is a user's file", ["fit-reward", src, "--out", "f", "--epochs", "1", "--hidden", "4"],
             setup=user_file("f"), protect=["f"], expect=frozenset({2})),
        Case("fit-reward --out == model dir of another run", ["fit-reward", src, "--out", str(ws / "models" / "rm_mlp"),
                                                              "--epochs", "1", "--hidden", "4"], expect=frozenset({2})),
        Case("fit-reward --out under the input file", ["fit-reward", src, "--out", src + "/sub", "--epochs", "1"],
             expect=frozenset({2})),
        Case("fit-reward --out user's dir --overwrite", ["fit-reward", src, "--out", "dir", "--epochs", "1",
                                                         "--hidden", "4", "--overwrite"],
             setup=user_dir("dir"), protect=["dir/keep.txt"], expect=frozenset({2})),
        Case("reproduce DATA --out is a user's file", ["reproduce", "data", src, "--out", "f", "--seeds", "1",
                                                        "--epochs", "1"], setup=user_file("f"), protect=["f"],
             expect=frozenset({2})),
        Case("reproduce DATA --out == DATA", ["reproduce", "data", src, "--out", src, "--seeds", "1"],
             expect=frozenset({2})),
        Case("align --out is the model dir", ["align", str(inp / "pattern.parquet"), "--model",
                                              str(ws / "models" / "lm"), "--out", str(ws / "models" / "lm"),
                                              "--max-steps", "1", "--device", "cpu"],
             expect=frozenset({2})),
        Case("align --out == DATA", ["align", str(inp / "pattern.parquet"), "--model", str(ws / "models" / "lm"),
                                     "--out", str(inp / "pattern.parquet"), "--max-steps", "1"], expect=frozenset({2})),
    ]
    return cases_


def option_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    src = str(inp / "pairs.parquet")
    out = []
    for value in ("1", "0.50000001", "-0.1", "nan", "-inf", "1e400", "0x10", "", "0,1", "١"):
        out.append(Case(f"corrupt --rate {value!r}", ["corrupt", src, "o.parquet", "--rate", value]))
    for value in ("-1", "4294967295", "4294967296", "99999999999999999999999", "1.5", "nan"):
        out.append(Case(f"corrupt --seed {value}", ["corrupt", src, "o.parquet", "--rate", "0.1", "--seed", value]))
    for value in ("0", "1", "0.0001", "1e-300", "-0", "nan"):
        out.append(Case(f"split --test-fraction {value}", ["split", src, "a.parquet", "b.parquet", "--test-fraction",
                                                           value]))
    for value in ("0", "-1", "1000000", "1000001", "1e3", "99999999999999999999"):
        out.append(Case(f"rank-check --bootstrap {value}", ["rank-check", src, "--pred", "score", "--bootstrap", value],
                        expect=frozenset({0, 1, 2}), timeout=90 if value != "1000000" else 30,
                        kill=(25, signal.SIGINT) if value == "1000000" else None))
    for value in ("-1", "0", "10000000", "10000001"):
        out.append(Case(f"rank-check --show-worst {value}", ["rank-check", src, "--pred", "score", "--show-worst",
                                                             value, "--bootstrap", "0"], expect=frozenset({0, 1, 2})))
    for value in ("-0.5", "1.5", "nan", "inf"):
        out.append(Case(f"rank-check --min-kendall {value}", ["rank-check", src, "--pred", "score", "--min-kendall",
                                                              value, "--bootstrap", "0"], expect=frozenset({0, 1, 2})))
    out.append(Case("rank-check --memory-responses 1", ["rank-check", src, "--pred", "score", "--memory-responses",
                                                        "1", "--bootstrap", "0"], expect=frozenset({0, 1})))
    out.append(Case("rank-check --temp-dir is a file", ["rank-check", src, "--pred", "score", "--memory-responses",
                                                        "10", "--temp-dir", src], expect=frozenset({2})))
    fit = lambda *extra: ["fit-reward", src, "--out", "rm", "--epochs", "1", "--hidden", "4", *extra]  # noqa: E731
    for flag, value in (("--epochs", "0"), ("--epochs", "1000001"), ("--batch-size", "0"), ("--batch-size", "1048577"),
                        ("--hidden", "65537"), ("--layers", "-1"), ("--layers", "1025"), ("--lr", "0"),
                        ("--lr", "1e31"), ("--lr", "nan"), ("--val-fraction", "1"), ("--val-fraction", "-0.1"),
                        ("--dropout", "1"), ("--dropout", "nan"), ("--output-clip", "-1"), ("--margin-scale", "0"),
                        ("--grad-accum", "65537"), ("--warmup", "1"), ("--early-stopping", "0"),
                        ("--max-grad-norm", "-1"), ("--weight-decay", "1001"), ("--loss", "nope"),
                        ("--device", "tpu"), ("--device", "cuda:99"), ("--precision", "fp8"), ("--seed", "-5"),
                        ("--save-every", "-1"), ("--log-every", "0"), ("--report-to", "wandb"),
                        ("--hidden", "60000")):
        out.append(Case(f"fit-reward {flag} {value}", fit(flag, value)))
    out.append(Case("fit-reward --hidden 65536 --layers 1024 (memory)", fit("--hidden", "65536", "--layers", "1024"),
                    expect=frozenset({2})))
    audit = lambda *extra: ["audit", str(inp / "annotated.parquet"), *extra]  # noqa: E731
    for extra in (("--folds", "1"), ("--folds", "1001"), ("--refits", "0"), ("--bootstrap", "-1"),
                  ("--threshold", "nan"), ("--threshold", "2"), ("--show-suspects", "-1"), ("--fix", "burn"),
                  ("--fix", "drop"), ("--estimate-only", "--json")):
        out.append(Case(f"audit --reward-col score {' '.join(extra)}", audit("--reward-col", "score", "--bootstrap",
                                                                             "20", *extra),
                        expect=frozenset({0, 2, 4})))
    return out


def model_cases(ws: Path) -> list[Case]:
    inp, models = ws / "inputs", ws / "models"
    out = []
    damage = ("truncated", "config_lies", "config_broken", "no_tokenizer", "header_huge", "no_weights",
              "remote_code", "config_dir", "pickle", "huge_vocab")
    for kind in damage:
        out.append(Case(f"score rm_tf_{kind}", ["score", str(models / f"rm_tf_{kind}"), str(inp / "pattern.parquet"),
                                                "o.parquet", "--device", "cpu"], expect=frozenset({2}), stdin=b"y\n"))
        out.append(Case(f"fit-reward --model lm_{kind}", ["fit-reward", str(inp / "pattern.parquet"), "--model",
                                                          str(models / f"lm_{kind}"), "--out", "rm", "--epochs", "1",
                                                          "--max-length", "32", "--device", "cpu"],
                        expect=frozenset({2}), stdin=b"y\n"))
        out.append(Case(f"align --model lm_{kind}", ["align", str(inp / "pattern.parquet"), "--model",
                                                     str(models / f"lm_{kind}"), "--out", "run", "--max-steps", "1",
                                                     "--device", "cpu", "--max-length", "32"],
                        expect=frozenset({2}), stdin=b"y\n"))
    for name in ("rm_mlp_config_garbage", "rm_mlp_no_weights", "empty_dir", "a_file", "no_such_dir", "org/model"):
        out.append(Case(f"score {name}", ["score", str(models / name) if name != "org/model" else name,
                                          str(inp / "pairs.parquet"), "o.parquet"], expect=frozenset({2})))
    out.append(Case("rank-check --model rm_tf_truncated", ["rank-check", str(inp / "pattern.parquet"), "--model",
                                                           str(models / "rm_tf_truncated")], expect=frozenset({2})))
    out.append(Case("audit --model lm_truncated", ["audit", str(inp / "pattern.parquet"), "--model",
                                                   str(models / "lm_truncated"), "--folds", "2"],
                    expect=frozenset({2})))
    out.append(Case("fit-reward embed+mlp --encoder lm_no_tokenizer",
                    ["fit-reward", str(inp / "pattern.parquet"), "--model", "embed+mlp", "--encoder",
                     str(models / "lm_no_tokenizer"), "--out", "rm", "--epochs", "1"], expect=frozenset({2})))
    out.append(Case("fit-reward transformer --batch-size huge --max-length huge (memory)",
                    ["fit-reward", str(inp / "pattern.parquet"), "--model", str(models / "lm"), "--out", "rm",
                     "--epochs", "1", "--batch-size", "1048576", "--max-length", "256", "--device", "cpu"],
                    expect=frozenset({0, 2})))
    out.append(Case("score a model dir while a file in it is a FIFO", ["score", "m", str(inp / "pairs.parquet"),
                                                                       "o.parquet"],
                    setup=lambda d: (shutil.copytree(models / "rm_mlp", d / "m"),
                                     (d / "m" / "reward_config.json").unlink(),
                                     os.mkfifo(d / "m" / "reward_config.json")), expect=frozenset({2})))
    return out


def signal_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    big = str(inp / "big.parquet")
    rng = random.Random(22)
    commands = [
        ["corrupt", big, "o.parquet", "--rate", "0.2"],
        ["corrupt", big, "o.jsonl", "--rate", "0.2"],
        ["corrupt", big, "o.csv", "--noise", "uniform"],
        ["split", big, "a.parquet", "b.parquet"],
        ["fit-reward", str(inp / "pairs.parquet"), "--out", "rm", "--epochs", "300", "--hidden", "64"],
        ["fit-reward", str(inp / "pairs.parquet"), "--out", "rm", "--epochs", "300", "--save-every", "20"],
        ["audit", str(inp / "pairs.parquet"), "--out", "a.parquet", "--folds", "3", "--epochs", "30"],
        ["rank-check", big, "--pred", "score", "--bootstrap", "2000", "--plot", "p.png"],
        ["score", str(ws / "models" / "rm_mlp"), str(inp / "pairs.parquet"), "s.parquet"],
        ["align", str(inp / "pattern.parquet"), "--model", str(ws / "models" / "lm"), "--out", "run", "--epochs", "20",
         "--device", "cpu", "--max-length", "32", "--save-every", "3"],
        ["reproduce", "data", str(inp / "pairs.parquet"), "--out", "rep", "--seeds", "2", "--epochs", "30"],
    ]
    out = []
    for command in commands:
        for sig in (signal.SIGINT, signal.SIGTERM):
            at = round(rng.uniform(2.0, 9.0), 2)
            out.append(Case(f"{command[0]} {command[2] if command[0] != 'fit-reward' else ''} {sig.name} at {at}s",
                            command, kill=(at, sig), expect=frozenset({0, 130, 143})))
    return out


def concurrency_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    big = str(inp / "big.parquet")
    return [
        Case("two corrupt at once on one OUT", ["corrupt", big, "o.parquet", "--rate", "0.1"], twin=True),
        Case("two split at once on one TRAIN", ["split", big, "a.parquet", "b.parquet"], twin=True),
        Case("two fit-reward at once on one --out", ["fit-reward", str(inp / "pairs.parquet"), "--out", "rm",
                                                     "--epochs", "3"], twin=True),
        Case("two audit at once on one --out", ["audit", str(inp / "annotated.parquet"), "--reward-col", "score",
                                                "--out", "a.parquet", "--bootstrap", "50"], twin=True),
        Case("two score at once on one OUT", ["score", str(ws / "models" / "rm_mlp"), str(inp / "pairs.parquet"),
                                              "s.parquet"], twin=True),
        Case("two reproduce DATA on one --out", ["reproduce", "data", str(inp / "pairs.parquet"), "--out", "rep",
                                                 "--seeds", "1", "--epochs", "2"], twin=True),
        Case("two rank-check --plot on one file", ["rank-check", big, "--pred", "score", "--bootstrap", "100",
                                                   "--plot", "p.png"], twin=True, expect=frozenset({0, 1, 2})),
    ]


def environment_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    src = str(inp / "pairs.parquet")
    corrupt = ["corrupt", src, "o.parquet", "--rate", "0.1"]
    fit = ["fit-reward", src, "--out", "rm", "--epochs", "1", "--hidden", "4"]

    def nonutf8_cwd(d: Path) -> None:
        os.mkdir(os.path.join(os.fsencode(d), b"caf\xe9"))

    return [
        Case("corrupt HOME unset", corrupt, env={"HOME": None}, expect=frozenset({0})),
        Case("fit-reward HOME unset", fit, env={"HOME": None}, expect=frozenset({0})),
        Case("corrupt TMPDIR missing", corrupt, env={"TMPDIR": "/nonexistent/tmp"}, expect=frozenset({0})),
        Case("fit-reward TMPDIR missing", fit, env={"TMPDIR": "/nonexistent/tmp"}, expect=frozenset({0, 2})),
        Case("rank-check TMPDIR is a file", ["rank-check", src, "--pred", "score", "--memory-responses", "50",
                                             "--bootstrap", "0"], env={"TMPDIR": src}, expect=frozenset({0, 1, 2})),
        Case("corrupt LANG=C", corrupt, env={"LANG": "C", "LC_ALL": "C"}, expect=frozenset({0})),
        Case("inspect LANG=C unicode", ["inspect", str(inp / "unicode_ids.csv")], env={"LANG": "C", "LC_ALL": "C"},
             expect=frozenset({0})),
        Case("inspect PYTHONIOENCODING=ascii", ["inspect", str(inp / "unicode_ids.csv")],
             env={"PYTHONIOENCODING": "ascii"}, expect=frozenset({0, 2})),
        Case("corrupt in a non-UTF-8 cwd", ["corrupt", src, "o.parquet", "--rate", "0.1"], setup=nonutf8_cwd,
             cwd="caf\udce9", expect=frozenset({0, 2})),
        Case("corrupt HF_HOME unwritable", corrupt, env={"HF_HOME": "/proc/nope"}, expect=frozenset({0})),
        Case("score HF_HUB_CACHE garbage hub id", ["score", "org/model", src, "o.parquet"],
             env={"HF_HUB_CACHE": "/nonexistent"}, expect=frozenset({2})),
        Case("corrupt COLUMNS=1", corrupt, env={"COLUMNS": "1"}, expect=frozenset({0})),
        Case("inspect COLUMNS=0 TERM=dumb", ["inspect", src], env={"COLUMNS": "0", "TERM": "dumb"},
             expect=frozenset({0})),
        Case("corrupt --config is /dev/zero", ["--config", "/dev/zero", *corrupt], expect=frozenset({2})),
        Case("corrupt --config binary", ["--config", str(inp / "garbage.parquet"), *corrupt], expect=frozenset({2})),
        Case("corrupt --config yaml bomb", ["--config", "bomb.yaml", *corrupt],
             setup=lambda d: write_text(d / "bomb.yaml", "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n"
                                                         "c: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c]\n"),
             expect=frozenset({2})),
        Case("corrupt --config unknown key", ["--config", "c.yaml", *corrupt],
             setup=lambda d: write_text(d / "c.yaml", "bogus_option: 3\n"), expect=frozenset({2})),
        Case("corrupt --config rate nan", ["--config", "c.yaml", "corrupt", src, "o.parquet"],
             setup=lambda d: write_text(d / "c.yaml", "rate: .nan\n"), expect=frozenset({2})),
        Case("corrupt --config python tag", ["--config", "c.yaml", *corrupt],
             setup=lambda d: write_text(d / "c.yaml", "rate: !!python/object/apply:os.system ['echo pwned']\n"),
             expect=frozenset({2})),
        Case("inspect with stdout closed", ["inspect", src], env={"__CLOSE_STDOUT": "1"}, expect=frozenset({0, 2})),
        Case("corrupt with stdin closed", corrupt, env={"__CLOSE_STDIN": "1"}, expect=frozenset({0})),
        Case("corrupt --debug on bad input shows traceback only then", ["--debug", "corrupt",
                                                                        str(inp / "garbage.parquet"),
                                                                        "o.parquet", "--rate", "0.1"],
             debug=True, expect=frozenset({2})),
    ]


def audit_cases(ws: Path) -> list[Case]:
    inp = ws / "inputs"
    ann = str(inp / "annotated.parquet")
    a = lambda *extra: ["audit", *extra]  # noqa: E731
    return [
        Case("audit --annotators ann1,ann2", a(ann, "--annotators", "ann1,ann2", "--bootstrap", "20"),
             expect=frozenset({0})),
        Case("audit --annotators missing column", a(ann, "--annotators", "ann1,nope"), expect=frozenset({2})),
        Case("audit --annotators the label's own column", a(ann, "--annotators", "chosen"), expect=frozenset({2})),
        Case("audit --annotators empty", a(ann, "--annotators", ""), expect=frozenset({2})),
        Case("audit --annotators duplicated", a(ann, "--annotators", "ann1,ann1", "--bootstrap", "10"),
             expect=frozenset({0, 2})),
        Case("audit --annotators NaN votes", a(str(inp / "nan_votes.jsonl"), "--annotators", "ann1,ann2"),
             expect=frozenset({2})),
        Case("audit --annotators float votes", a(str(inp / "float_votes.csv"), "--annotators", "ann1,ann2"),
             expect=frozenset({2})),
        Case("audit --votes bad vote", a(ann, "--votes", str(inp / "bad_votes.csv")), expect=frozenset({2})),
        Case("audit --votes unknown pair", a(ann, "--votes", str(inp / "votes_unknown_pair.csv")),
             expect=frozenset({2})),
        Case("audit --votes nan vote", a(ann, "--votes", str(inp / "votes_nan.csv")), expect=frozenset({2})),
        Case("audit --votes ok", a(ann, "--votes", str(inp / "votes.csv"), "--bootstrap", "10"),
             expect=frozenset({0})),
        Case("audit --votes empty file", a(ann, "--votes", str(inp / "empty.csv")), expect=frozenset({2})),
        Case("audit --votes is a directory", a(ann, "--votes", str(inp / "a_directory.parquet")),
             expect=frozenset({2})),
        Case("audit --votes == --out", a(ann, "--votes", str(inp / "votes.csv"), "--out", str(inp / "votes.csv"),
                                         "--fix", "drop"), expect=frozenset({2})),
        Case("audit --gold gold with margins", a(ann, "--margin-col", "margin", "--gold", "gold", "--bootstrap", "20"),
             expect=frozenset({0})),
        Case("audit --gold missing column", a(ann, "--margin-col", "margin", "--gold", "nope"), expect=frozenset({2})),
        Case("audit --gold all null", a(ann, "--margin-col", "margin", "--gold", "ann2"), expect=frozenset({0, 2})),
        Case("audit --gold a text column", a(ann, "--margin-col", "margin", "--gold", "prompt"), expect=frozenset({2})),
        Case("audit --margin-col text", a(ann, "--margin-col", "prompt"), expect=frozenset({2})),
        Case("audit --margin-col nan", a(str(inp / "nan_scores.jsonl"), "--margin-col", "chosen_score"),
             expect=frozenset({2})),
        Case("audit --reward-col nan", a(str(inp / "nan_scores.jsonl"), "--reward-col", "score"),
             expect=frozenset({2})),
        Case("audit --reward-col inf", a(str(inp / "inf_scores.jsonl"), "--reward-col", "score"),
             expect=frozenset({2})),
        Case("audit --position-col with ties", a(ann, "--annotators", "ann1,ann2", "--position-col", "ann1"),
             expect=frozenset({2})),
        Case("audit --by column:missing", a(ann, "--annotators", "ann1,ann2", "--by", "column:nope"),
             expect=frozenset({2})),
        Case("audit --annotators --fix swap --out", a(ann, "--annotators", "ann1,ann2", "--fix", "swap", "--out",
                                                      "c.parquet", "--bootstrap", "10"), expect=frozenset({0, 4})),
        Case("audit --plot to a FIFO", a(ann, "--reward-col", "score", "--plot", "p.png", "--bootstrap", "10"),
             setup=lambda d: os.mkfifo(d / "p.png"), expect=frozenset({2})),
        Case("audit --reward-col on text without scores", a(str(inp / "pattern.parquet"), "--reward-col", "score"),
             expect=frozenset({2})),
    ]


def train_cases(ws: Path) -> list[Case]:
    inp, models = ws / "inputs", ws / "models"
    data = str(inp / "pattern.parquet")
    al = lambda *extra: ["align", data, "--model", str(models / "lm"), "--out", "run", "--device", "cpu",  # noqa: E731
                         "--max-length", "32", "--max-prompt-length", "16", *extra]
    rep = lambda *extra: ["reproduce", "data", str(inp / "pairs.parquet"), "--out", "rep", "--seeds", "1",  # noqa: E731
                          "--epochs", "2", *extra]
    return [
        Case("align tiny ok", al("--max-steps", "2", "--batch-size", "4"), expect=frozenset({0})),
        Case("align --beta 0", al("--max-steps", "1", "--beta", "0"), expect=frozenset({2})),
        Case("align --beta nan", al("--max-steps", "1", "--beta", "nan"), expect=frozenset({2})),
        Case("align --loss cdpo without smoothing", al("--max-steps", "1", "--loss", "cdpo"), expect=frozenset({2})),
        Case("align --noise-rate 0.5 rdpo", al("--max-steps", "1", "--loss", "rdpo", "--noise-rate", "0.5"),
             expect=frozenset({2})),
        Case("align --noise-rate-from garbage", al("--max-steps", "1", "--loss", "rdpo", "--noise-rate-from",
                                                   str(inp / "garbage.jsonl")), expect=frozenset({2})),
        Case("align --noise-rate-from FIFO", al("--max-steps", "1", "--loss", "rdpo", "--noise-rate-from", "f.json"),
             setup=lambda d: os.mkfifo(d / "f.json"), expect=frozenset({2})),
        Case("align --max-length 1", al("--max-steps", "1", "--max-length", "1", "--max-prompt-length", "1"),
             expect=frozenset({0, 2})),
        Case("align --max-length 1048577", al("--max-steps", "1", "--max-length", "1048577"), expect=frozenset({2})),
        Case("align --batch-size 1000 (more than rows)", al("--max-steps", "1", "--batch-size", "1000"),
             expect=frozenset({2})),
        Case("align --batch-size 1048576 --max-length 1048576 (memory)", al("--max-steps", "1", "--batch-size",
                                                                           "40", "--max-length", "1048576"),
             expect=frozenset({0, 2})),
        Case("align --val-fraction 0.99", al("--max-steps", "1", "--val-fraction", "0.99"), expect=frozenset({0, 2})),
        # nothing to continue and nothing to lose: a new run (an interruption before the first checkpoint
        # leaves nothing, and "the same line with --resume" must work); a finished run is refused (below)
        Case("align --resume without a run", al("--max-steps", "1", "--resume"), expect=frozenset({0})),
        Case("align --dry-run huge lora", al("--dry-run", "--lora-r", "65536"), expect=frozenset({0, 2})),
        Case("align data without text", ["align", str(inp / "nan_scores.jsonl"), "--model", str(models / "lm"),
                                         "--out", "run", "--max-steps", "1", "--device", "cpu"],
             expect=frozenset({0, 2})),
        Case("align data empty", ["align", str(inp / "empty.jsonl"), "--model", str(models / "lm"), "--out", "run",
                                  "--max-steps", "1"], expect=frozenset({2})),
        Case("reproduce DATA tiny ok", rep(), expect=frozenset({0})),
        Case("reproduce DATA --seeds 0", rep("--seeds", "0"), expect=frozenset({2})),
        Case("reproduce DATA --seeds 1001", rep("--seeds", "1001"), expect=frozenset({2})),
        Case("reproduce DATA --rate 0.6", rep("--rate", "0.6"), expect=frozenset({2})),
        Case("reproduce DATA --losses nope", rep("--losses", "nope"), expect=frozenset({2})),
        Case("reproduce DATA on empty", ["reproduce", "data", str(inp / "empty.csv"), "--out", "rep"],
             expect=frozenset({2})),
        Case("reproduce DATA on header-only", ["reproduce", "data", str(inp / "header_only.csv"), "--out", "rep"],
             expect=frozenset({2})),
        Case("reproduce DATA on 3 rows", ["reproduce", "data", str(inp / "prompt_int.jsonl"), "--out", "rep"],
             expect=frozenset({2})),
        Case("reproduce DATA --bootstrap nan", rep("--bootstrap", "nan"), expect=frozenset({2})),
        Case("reproduce synthetic --train-pairs 5", ["reproduce", "synthetic", "--out", "syn", "--train-pairs", "5"],
             expect=frozenset({2})),
        Case("reproduce alignment --pairs 1e9", ["reproduce", "alignment", "--out", "al", "--pairs", "1000000000"],
             expect=frozenset({2})),
        Case("fit-reward embed+mlp without --encoder", ["fit-reward", str(inp / "pairs.parquet"), "--model",
                                                        "embed+mlp", "--out", "rm"], expect=frozenset({2})),
        Case("fit-reward --resume on a finished run", ["fit-reward", str(inp / "pairs.parquet"), "--out",
                                                       str(models / "rm_mlp"), "--resume"], expect=frozenset({2})),
    ]


# ---------------------------------------------------------------- running and checking


def environment(case: Case, tmpdir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "PYTHONWARNINGS": ""}
    env.pop("PYTEST_XDIST_WORKER", None)
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start(case: Case, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    argv = [PY, "-m", "prefnoise", *([] if case.debug or "--debug" in case.argv else ["-q"]), *case.argv]
    kwargs: dict = {"cwd": cwd, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                    "stdin": subprocess.PIPE if case.stdin is not None else subprocess.DEVNULL}
    if env.pop("__CLOSE_STDOUT", None):
        kwargs["stdout"] = None
        kwargs["pass_fds"] = ()
        argv = ["sh", "-c", 'exec "$@" >&-', "sh", *argv]
    if env.pop("__CLOSE_STDIN", None):
        kwargs["stdin"] = None
        argv = ["sh", "-c", 'exec "$@" <&-', "sh", *argv]
    return subprocess.Popen(argv, **kwargs)


def run_case(case: Case, ws: Path, index: int) -> tuple[Case, list[str], str]:
    """Run ``case`` in its own directory; the rules it broke, and a short transcript."""
    d = ws / "runs" / f"{index:03d}"
    tmpdir = ws / "tmp" / f"{index:03d}"
    d.mkdir(parents=True)
    tmpdir.mkdir(parents=True)
    os.chmod(d, 0o777)
    os.chmod(tmpdir, 0o777)
    if case.setup is not None:
        case.setup(d)
    guarded = {**snapshot(ws / "inputs"), **snapshot(ws / "models"),
               **{str(d / p): sha(d / p) for p in case.protect}}
    cwd = d if case.cwd is None else (Path(case.cwd) if os.path.isabs(case.cwd) else d / case.cwd)
    env = environment(case, tmpdir)
    procs = [start(case, cwd, dict(env)) for _ in range(2 if case.twin else 1)]
    if case.stdin is not None:
        for proc in procs:
            try:
                proc.stdin.write(case.stdin)
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            proc.stdin = None  # communicate() must not flush it again
    if case.kill is not None:
        time.sleep(case.kill[0])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(case.kill[1])
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=case.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            results.append((-999, stdout or b"", stderr or b""))
            continue
        results.append((proc.returncode, stdout or b"", stderr or b""))
    problems = []
    for rc, _, err_bytes in results:
        problems += judge(case, rc, err_bytes.decode("utf-8", "replace"))
    if case.twin:
        codes = sorted(rc for rc, _, _ in results)
        if codes == [0, 0]:
            problems.append("both concurrent runs exited 0")
    after = {**snapshot(ws / "inputs"), **snapshot(ws / "models")}
    for path, digest in guarded.items():
        now = after.get(path) if not path.startswith(str(d)) else (sha(Path(path)) if Path(path).is_file() else None)
        if now != digest:
            problems.append(f"changed: {Path(path).relative_to(ws)}")
    left = leftovers(d) + [f"TMPDIR/{p}" for p in os.listdir(tmpdir) if not p.startswith(LIBRARY_TMP)]
    left += [f"inputs/{p}" for p in leftovers(ws / "inputs")]
    if left:
        problems.append(f"left behind: {', '.join(sorted(left)[:5])}")
    transcript = " | ".join(f"rc={rc} {err.decode('utf-8', 'replace').strip()[-300:]!r}" for rc, _, err in results)
    return case, problems, transcript


def judge(case: Case, rc: int, err: str) -> list[str]:
    """The rules one process's exit code and stderr broke."""
    problems = []
    if rc == -999:
        problems.append(f"hung past {case.timeout:.0f}s")
        return problems
    if rc == 3:
        problems.append("exit 3 (internal error)")
    elif rc not in case.expect and not (case.twin and rc == 2):
        problems.append(f"exit {rc}, expected {sorted(case.expect)}")
    if "Traceback" in err and not case.debug:
        problems.append("traceback without --debug")
    if rc in (2, 3):
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Note:", "Warning:"))]
        if len(lines) != 1 or not lines[0].startswith("Error:"):
            if not (case.debug and lines and lines[-1].startswith("Error:")):
                problems.append(f"not one error line ({len(lines)} lines)")
    if rc < 0:
        problems.append(f"killed by signal {-rc}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="run the cases whose name holds one of these |-separated parts")
    parser.add_argument("--verbose", action="store_true", help="print every case's exit code and stderr")
    parser.add_argument("--keep", type=Path, default=None, help="workspace directory to keep (default: a temporary)")
    args = parser.parse_args()
    ws = args.keep or Path(tempfile.mkdtemp(prefix="hostile-sweep-"))
    if not (ws / "inputs").exists():
        make_workspace(ws)
    os.chmod(ws, 0o755)
    selected = [c for c in cases(ws) if any(part in c.name for part in args.only.split("|"))]
    if (ws / "runs").exists():
        shutil.rmtree(ws / "runs", ignore_errors=True)
        shutil.rmtree(ws / "tmp", ignore_errors=True)
    started = time.time()
    failures = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_case, case, ws, i) for i, case in enumerate(selected)]
        for future in concurrent.futures.as_completed(futures):
            try:
                case, problems, transcript = future.result()
            except Exception as error:  # a harness failure is reported, not fatal
                failures += 1
                print(f"HARNESS {error!r}", flush=True)
                continue
            if args.verbose and not problems:
                print(f"ok   {case.name}\n     {transcript}", flush=True)
            if problems:
                failures += 1
                print(f"FAIL {case.name}: {'; '.join(problems)}\n     {transcript}", flush=True)
    print(f"{len(selected)} cases, {len(selected) - failures} clean, {failures} failing, "
          f"{time.time() - started:.0f} s; workspace {ws}", flush=True)
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
