"""The Python API (``import prefnoise as pn``): every table type, the CLI's results, the README example."""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import prefnoise as pn
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import invoke
from tests.conftest import ROOT, make_feature_pairs, make_pairs

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

KINDS = ("polars", "lazy", "pandas", "pyarrow", "dataset")
TIMING = ("seconds", "rows_per_second")
README_SECTION = "## As a library"
SECTION_FALLBACK = Path("/tmp/sections/api-README.md")  # until the lead merges the section into README.md


def as_kind(frame: pl.DataFrame, kind: str):
    """``frame`` as the table type ``kind``."""
    return {
        "polars": lambda: frame,
        "lazy": frame.lazy,
        "pandas": frame.to_pandas,
        "pyarrow": frame.to_arrow,
        "dataset": lambda: datasets.Dataset.from_polars(frame),
    }[kind]()


def cli_json(*args, code: int = 0) -> dict:
    """Run ``prefnoise ARGS... --json`` in-process (expecting exit ``code``); its JSON object without
    ``schema_version`` (the one key the CLI adds to the API's summary)."""
    result = invoke(*args, "--json")
    assert result.exit_code == code, result.output
    payload = json.loads(result.stdout)
    assert payload.pop("schema_version") == 1
    return payload


def without(summary: dict, *keys: str) -> dict:
    """``summary`` (as strict JSON) without ``keys``."""
    return {k: v for k, v in json.loads(json.dumps(summary)).items() if k not in keys}


@pytest.fixture(scope="module")
def text_pairs(tmp_path_factory) -> tuple[pl.DataFrame, Path]:
    """Sixty text pairs with true scores, no pair_id (in memory and as Parquet)."""
    frame = make_pairs(60, seed=3)
    path = tmp_path_factory.mktemp("api") / "pairs.parquet"
    frame.write_parquet(path)
    return frame, path


@pytest.fixture(scope="module")
def feature_pairs(tmp_path_factory) -> tuple[pl.DataFrame, Path]:
    """Eighty feature pairs (mlp backend) in memory and as Parquet."""
    frame = make_feature_pairs(80, seed=2)
    path = tmp_path_factory.mktemp("api") / "features.parquet"
    frame.write_parquet(path)
    return frame, path


@pytest.fixture(scope="module")
def reward_dir(feature_pairs, tmp_path_factory) -> Path:
    """A small mlp reward model written by the CLI."""
    _, data = feature_pairs
    out = tmp_path_factory.mktemp("api") / "rm"
    result = invoke("fit-reward", data, "--out", out, "--epochs", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("kind", KINDS)
def test_as_polars_canonicalises_every_table_type(text_pairs, kind):
    frame, path = text_pairs
    table = pn.as_polars(as_kind(frame, kind))
    assert_frame_equal(table, pn.read_table(path))  # the CLI's reading of the same rows, pair_id added
    assert table.columns[:4] == ["pair_id", "prompt", "chosen", "rejected"]


def test_as_polars_maps_columns_and_layout_like_the_cli(tmp_path):
    renamed = make_pairs(5).rename({"prompt": "question", "chosen": "good", "rejected": "bad"})
    mapped = pn.as_polars(renamed.to_pandas(), prompt_col="question", chosen_col="good", rejected_col="bad")
    assert mapped["prompt"].to_list() == [f"question {i}" for i in range(5)]
    hh = pl.DataFrame({"chosen": ["\n\nHuman: hi\n\nAssistant: hello"], "rejected": ["\n\nHuman: hi\n\nAssistant: go"]})
    split = pn.as_polars(hh.to_arrow(), layout="hh")
    assert split.row(0, named=True) | {"pair_id": None} == {
        "pair_id": None, "prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go",
    }
    messages = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "assistant", "content": "5"}]}]
    conversational = pn.as_polars(datasets.Dataset.from_list(messages))
    assert (conversational["prompt"][0], conversational["chosen"][0]) == ("user: 2+2?", "4")
    assert json.loads(conversational["prompt_messages"][0]) == messages[0]["prompt"]


def test_bad_in_memory_tables_are_one_line_errors():
    missing = make_pairs(3).drop("rejected").to_pandas()
    with pytest.raises(PrefnoiseError, match=r"^<pandas\.DataFrame>: missing required column\(s\) 'rejected'"):
        pn.corrupt(missing, rate=0.1)
    same = pl.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["a"]})
    with pytest.raises(PrefnoiseError, match="'chosen' equals 'rejected'.*drop-invalid"):
        pn.as_polars(same)
    two = pl.concat([same, make_pairs(2).select("prompt", "chosen", "rejected")])
    assert pn.as_polars(two, drop_invalid=True).height == 2
    with pytest.raises(PrefnoiseError, match="DatasetDict.*pass one split"):
        pn.as_polars(datasets.DatasetDict({"train": datasets.Dataset.from_polars(make_pairs(2))}))
    with pytest.raises(PrefnoiseError, match="not a table prefnoise reads"):
        pn.as_polars(42)
    with pytest.raises(PrefnoiseError, match=r"^rate= must be in"):
        pn.corrupt(make_pairs(3), rate=1.5)  # the CLI's range checks apply to the API too


# --------------------------------------------------------------------------- the CLI's results


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_equals_the_cli(text_pairs, tmp_path, kind):
    frame, path = text_pairs
    out = tmp_path / "noisy.parquet"
    expected = cli_json("corrupt", path, out, "--rate", "0.3", "--seed", "5")
    result = pn.corrupt(as_kind(frame, kind), rate=0.3, seed=5)
    assert_frame_equal(result.table, pl.read_parquet(out))
    assert result.table["flipped"].sum() == expected["flips"] > 0
    assert without(result.summary, "input", "output", *TIMING) == without(expected, "input", "output", *TIMING)
    assert result.summary["input"] == {"lazy": "<polars.LazyFrame>", "polars": "<polars.DataFrame>"}.get(
        kind, result.summary["input"]
    )


def test_corrupt_to_a_file_streams_with_provenance(text_pairs, tmp_path):
    frame, path = text_pairs
    result = pn.corrupt(path, tmp_path / "a.parquet", rate=0.4, exact=True, seed=2)
    assert result.table is None and result.summary["output"] == str(tmp_path / "a.parquet")
    cli = cli_json("corrupt", path, tmp_path / "b.parquet", "--rate", "0.4", "--exact", "--seed", "2")
    assert_frame_equal(pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet"))
    (step,) = pn.read_history(tmp_path / "a.parquet")
    assert (step["command"], step["seed"], step["input"]["path"]) == ("corrupt", 2, str(path))
    assert without(result.summary, "output", *TIMING) == without(cli, "output", *TIMING)
    with pytest.raises(PrefnoiseError, match="exists"):  # never replaced without overwrite
        pn.corrupt(frame, tmp_path / "a.parquet", rate=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_split_equals_the_cli(text_pairs, tmp_path, kind):
    frame, path = text_pairs
    expected = cli_json("split", path, tmp_path / "tr.parquet", tmp_path / "te.parquet", "--test-fraction", "0.3",
                        "--seed", "4")
    train, test = pn.split(as_kind(frame, kind), test_fraction=0.3, seed=4)
    assert_frame_equal(train, pl.read_parquet(tmp_path / "tr.parquet"))
    assert_frame_equal(test, pl.read_parquet(tmp_path / "te.parquet"))
    result = pn.split(as_kind(frame, kind), tmp_path / "a.parquet", tmp_path / "b.parquet", test_fraction=0.3, seed=4)
    assert without(result.summary, "input") == without(
        expected | {"train": {**expected["train"], "output": str(tmp_path / "a.parquet")},
                    "test": {**expected["test"], "output": str(tmp_path / "b.parquet")}}, "input")
    assert_frame_equal(pl.read_parquet(tmp_path / "b.parquet"), test)


@pytest.mark.parametrize("kind", KINDS)
def test_score_and_rank_check_equal_the_cli(feature_pairs, reward_dir, tmp_path, kind):
    frame, path = feature_pairs
    scored_path = tmp_path / "scored.parquet"
    expected = cli_json("score", reward_dir, path, scored_path)
    scored = pn.score(reward_dir, as_kind(frame, kind))
    cli_table = pl.read_parquet(scored_path)
    if kind == "pandas":  # pandas has no fixed-size arrays: the feature vectors come back as lists
        cli_table = cli_table.with_columns(pl.col("^.*_features$").cast(pl.List(pl.Float32)))
    assert_frame_equal(scored.table, cli_table)
    assert without(scored.summary, "input", "output", "rows", *TIMING) == without(
        expected, "input", "output", "rows", *TIMING)
    assert expected["input"] == str(path) and scored.summary["input"].startswith("<")  # a path; an in-memory table
    assert scored.summary["seen"] == expected["seen"] and expected["seen"]["train"] > 0

    rank_cli = cli_json("rank-check", scored_path, "--bootstrap", "100", "--min-agreement", "0.99", code=1)
    report = pn.rank_check(as_kind(scored.table, kind), bootstrap=100, min_agreement=0.99)
    assert without(report.summary, "input") == without(rank_cli, "input")
    assert rank_cli["gates"] == [
        {"metric": "agreement", "op": ">=", "threshold": 0.99, "value": rank_cli["overall"]["agreement"]["value"],
         "passed": False}
    ]
    value = rank_cli["overall"]["agreement"]["value"]
    assert not report.passed and report.failures == [f"agreement {value:.4f} < 0.99"]


def test_rank_check_with_a_model_scores_first(feature_pairs, reward_dir, tmp_path):
    frame, path = feature_pairs
    direct = pn.rank_check(pn.score(reward_dir, frame).table, bootstrap=50, group_by="in_training")
    via_model = pn.rank_check(frame, model=reward_dir, bootstrap=50, group_by="in_training")
    assert without(via_model.summary, "input") == without(direct.summary, "input")
    cli = cli_json("rank-check", path, "--model", reward_dir, "--bootstrap", "50", "--group-by", "in_training")
    assert without(cli, "input") == without(direct.summary, "input")


def test_fit_reward_on_every_table_type_matches_the_cli(feature_pairs, reward_dir, tmp_path):
    frame, _ = feature_pairs
    cli = json.loads((reward_dir / "metrics.json").read_text())
    for kind in KINDS:
        fit = pn.fit_reward(as_kind(frame, kind), epochs=3, seed=1)
        assert fit.summary["final"] == cli["final"], kind
        assert fit.model.backend == "mlp"
    saved = pn.fit_reward(frame, tmp_path / "rm", epochs=3, seed=1)
    assert (tmp_path / "rm" / "reward_config.json").is_file() and saved.summary["output"] == str(tmp_path / "rm")
    scores = [pn.score(m, frame).table["chosen_reward"] for m in (saved, tmp_path / "rm", saved.model)]
    assert scores[0].to_list() == scores[1].to_list() == scores[2].to_list()


def test_audit_equals_the_cli_on_every_table_type(feature_pairs, tmp_path):
    frame, _ = feature_pairs
    noisy = pn.corrupt(frame, rate=0.25, seed=3).table
    noisy.write_parquet(tmp_path / "noisy.parquet")
    options = {"folds": 2, "refits": 1, "epochs": 3, "bootstrap": 20, "seed": 1}
    cli = cli_json("audit", tmp_path / "noisy.parquet", *[f"--{k}={v}" for k, v in options.items()])
    results = [pn.audit(as_kind(noisy, kind), **options) for kind in ("polars", "pandas", "dataset")]
    for result in results:
        assert without(result.summary, "input") == without(cli, "input")
    assert cli["pairs"] == 80 and "against_flipped" in cli
    assert {"fold", "oof_margin", "suspicion"} <= set(results[0].table.columns)
    assert pn.noise_audit.MARGIN == "oof_margin" and callable(pn.audit)


def test_align_dry_run_equals_the_cli(lm_path, text_pairs):
    frame, path = text_pairs
    cli = cli_json("align", path, "--model", lm_path, "--dry-run", "--max-length", "64", "--max-prompt-length", "32",
                   "--batch-size", "4")
    for kind in ("polars", "dataset"):
        plan = pn.align(as_kind(frame, kind), model=lm_path, dry_run=True, max_length=64, max_prompt_length=32,
                        batch_size=4)
        assert plan.dry_run and without(plan.summary, "input") == without(cli, "input")
    assert cli["input"] == str(path)
    with pytest.raises(PrefnoiseError, match="unknown option 'betta'"):
        pn.align(frame, model=lm_path, dry_run=True, betta=0.1)
    with pytest.raises(PrefnoiseError, match="--out DIR is required"):
        pn.align(frame, model=lm_path)


def test_every_subcommand_has_a_call_with_the_clis_option_names():
    import inspect

    import typer

    from prefnoise.cli import app

    command = typer.main.get_command(app)
    calls = {"corrupt": pn.corrupt, "split": pn.split, "score": pn.score, "rank-check": pn.rank_check,
             "fit-reward": pn.fit_reward, "audit": pn.api.audit, "align": pn.api.align}
    cli_only = {"json_output", "estimate_only", "source", "data", "dest", "train_dest", "test_dest", "model_dir"}
    for name, call in calls.items():
        accepted = set(inspect.signature(call).parameters)
        takes_more = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(call).parameters.values())
        options = {p.name for p in command.commands[name].params} - cli_only
        if name == "align":  # its training options are AlignConfig's fields, passed as keywords
            from dataclasses import fields

            from prefnoise.options.align import AlignConfig

            accepted |= {f.name for f in fields(AlignConfig)}
        missing = options - accepted
        assert not missing or takes_more, (name, missing)
        assert not missing - {n for n in missing if n.endswith(("_col", "split", "config"))}, (name, missing)


# --------------------------------------------------------------------------- the README


def readme_section() -> str:
    """The README's "As a library" section (the helper's draft until it is merged)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if "pn.corrupt(" not in text and SECTION_FALLBACK.is_file():
        text = SECTION_FALLBACK.read_text(encoding="utf-8")
    start = text.index(f"\n{README_SECTION}\n")
    end = text.find("\n## ", start + len(README_SECTION))
    return text[start : end if end > 0 else None]


def test_the_readme_example_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S)
    assert blocks, "no python block in the README section"
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        printed = io.StringIO()
        with redirect_stdout(printed):
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
        lines = block.splitlines()
        claimed = [lines[i + 1].removeprefix("# ").strip() for i, line in enumerate(lines[:-1])
                   if line.startswith("print(") and lines[i + 1].startswith("# ")]
        assert printed.getvalue().splitlines() == claimed
    assert os.path.exists("noisy.parquet")
