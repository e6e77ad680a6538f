"""`--json` is a contract: every command's object validates against docs/schemas/<command>.json.

Every command runs once on tiny generated data (the smallest settings the other tests use); its object
must carry ``schema_version`` 1, name the table read ``input`` and what it wrote ``output``, and give
rank-check's gates as ``{metric, op, threshold, value, passed}`` objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from tiny_models import pattern_pairs

from tests.cli_helpers import invoke
from tests.conftest import ROOT, make_feature_pairs

SCHEMAS = ROOT / "docs" / "schemas"
COMMANDS = ("corrupt", "split", "fit-reward", "score", "rank-check", "audit", "align", "inspect", "reproduce")
LEGACY_KEYS = {"out", "file", "source", "gate_failures"}  # the old names of input, output and the gates


def schema(command: str) -> dict:
    return json.loads((SCHEMAS / f"{command}.json").read_text(encoding="utf-8"))


def payload(*args, code: int = 0) -> dict:
    """Run ``prefnoise ARGS... --json`` in-process (expecting exit ``code``); the JSON object it printed."""
    result = invoke(*args, "--json")
    assert result.exit_code == code, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one object on one line
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, lm_path) -> dict[str, dict]:
    """Every command's --json object, from one small pipeline (120 feature pairs, one epoch each)."""
    tmp = tmp_path_factory.mktemp("contract")
    data, noisy, train, test = (tmp / f"{name}.parquet" for name in ("data", "noisy", "train", "test"))
    make_feature_pairs(120, seed=2).write_parquet(data)
    pattern_pairs(32, seed=8).write_parquet(tmp / "lm-pairs.parquet")
    lm_args = ("--model", lm_path, "--batch-size", "8", "--max-length", "32", "--max-prompt-length", "16")
    got = {
        "corrupt": payload("corrupt", data, noisy, "--rate", "0.2", "--seed", "1"),
        "split": payload("split", noisy, train, test, "--test-fraction", "0.3"),
        "fit-reward": payload("fit-reward", train, "--out", tmp / "rm", "--epochs", "1"),
        "score": payload("score", tmp / "rm", test, tmp / "scored.parquet"),
        # one gate that passes and one that cannot: exit 1, and the JSON still printed first
        "rank-check": payload("rank-check", tmp / "scored.parquet", "--bootstrap", "20", "--min-agreement", "0",
                              "--min-kendall", "0.999", code=1),
        "audit": payload("audit", noisy, "--folds", "2", "--refits", "1", "--epochs", "1", "--bootstrap", "0"),
        "inspect": payload("inspect", tmp / "scored.parquet"),
        "align": payload("align", tmp / "lm-pairs.parquet", *lm_args, "--out", tmp / "run", "--max-steps", "1",
                         "--device", "cpu"),
        "align --dry-run": payload("align", tmp / "lm-pairs.parquet", *lm_args, "--dry-run"),
        "reproduce synthetic": payload("reproduce", "synthetic", "--out", tmp / "rs", "--quick", "--seeds", "1",
                                       "--epochs", "1", "--train-pairs", "50", "--test-pairs", "50", "--rates", "0.0",
                                       "--losses", "sigmoid", "--noise", "symmetric", "--device", "cpu"),
        "reproduce alignment": payload("reproduce", "alignment", "--out", tmp / "ra", "--quick", "--seeds", "1",
                                       "--epochs", "1", "--pairs", "40", "--no-asymmetric"),
        "reproduce data": payload("reproduce", data, "--out", tmp / "rd", "--losses", "sigmoid", "--rates", "0",
                                  "--seeds", "1", "--epochs", "1", "--bootstrap", "20"),
    }
    got["paths"] = {"data": str(data), "noisy": str(noisy), "train": str(train), "test": str(test), "tmp": str(tmp)}
    return got


def test_every_schema_is_a_valid_draft_2020_12_schema():
    assert sorted(p.stem for p in SCHEMAS.glob("*.json")) == sorted(COMMANDS)
    for command in COMMANDS:
        document = schema(command)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(document)
        assert document["properties"]["schema_version"] == {
            "const": 1, "description": document["properties"]["schema_version"]["description"]
        }
        assert "schema_version" in document["required"]


@pytest.mark.parametrize(
    "name",
    ["corrupt", "split", "fit-reward", "score", "rank-check", "audit", "inspect", "align", "align --dry-run",
     "reproduce synthetic", "reproduce alignment", "reproduce data"],
)
def test_every_commands_json_validates_against_its_schema(outputs, name):
    document = outputs[name]
    jsonschema.Draft202012Validator(schema(name.split()[0])).validate(document)
    assert document["schema_version"] == 1
    legacy = LEGACY_KEYS - ({"source"} if name == "reproduce synthetic" else set())  # there: --source's value
    assert not legacy & set(document), sorted(legacy & set(document))


def test_one_name_for_the_input_and_the_output(outputs):
    paths = outputs["paths"]
    tmp = Path(paths["tmp"])
    assert (outputs["corrupt"]["input"], outputs["corrupt"]["output"]) == (paths["data"], paths["noisy"])
    assert outputs["split"]["input"] == paths["noisy"]
    assert (outputs["split"]["train"]["output"], outputs["split"]["test"]["output"]) == (paths["train"], paths["test"])
    assert (outputs["fit-reward"]["input"], outputs["fit-reward"]["output"]) == (paths["train"], str(tmp / "rm"))
    assert (outputs["score"]["input"], outputs["score"]["output"]) == (paths["test"], str(tmp / "scored.parquet"))
    assert outputs["score"]["model"] == str(tmp / "rm")
    assert outputs["rank-check"]["input"] == str(tmp / "scored.parquet")
    assert (outputs["audit"]["input"], outputs["audit"]["output"]) == (paths["noisy"], None)
    assert outputs["inspect"]["input"] == str(tmp / "scored.parquet")
    lm_pairs = str(tmp / "lm-pairs.parquet")
    assert (outputs["align"]["input"], outputs["align"]["output"]) == (lm_pairs, str(tmp / "run"))
    assert outputs["align --dry-run"]["input"] == lm_pairs and outputs["align --dry-run"]["dry_run"] is True
    assert outputs["reproduce synthetic"]["output"] == str(tmp / "rs")
    assert outputs["reproduce alignment"]["output"] == str(tmp / "ra")
    assert (outputs["reproduce data"]["input"], outputs["reproduce data"]["output"]) == (paths["data"], str(tmp / "rd"))


def test_rank_check_gates_are_objects_with_the_metric_value(outputs):
    report = outputs["rank-check"]
    agreement, tau = report["overall"]["agreement"]["value"], report["overall"]["kendall_tau_b"]
    assert report["gates"] == [
        {"metric": "agreement", "op": ">=", "threshold": 0.0, "value": agreement, "passed": True},
        {"metric": "kendall_tau_b", "op": ">=", "threshold": 0.999, "value": tau, "passed": False},
    ]


def test_the_schemas_reject_the_old_shapes(outputs):
    # the test can fail: the old names, a missing version and prose gates are all refused
    rank = dict(outputs["rank-check"])
    old = {k: v for k, v in rank.items() if k not in ("input", "gates")} | {
        "source": rank["input"], "gate_failures": ["kendall_tau_b 0.3000 < 0.999"]
    }
    validator = jsonschema.Draft202012Validator(schema("rank-check"))
    assert {e.validator for e in validator.iter_errors(old)} == {"required"}
    assert not validator.is_valid({**rank, "gates": ["kendall_tau_b 0.3000 < 0.999"]})
    assert not validator.is_valid({**rank, "schema_version": 2})
    for command in ("corrupt", "inspect", "fit-reward"):
        document = {k: v for k, v in outputs[command].items() if k != "schema_version"}
        assert not jsonschema.Draft202012Validator(schema(command)).is_valid(document), command
    fit = {k: v for k, v in outputs["fit-reward"].items() if k != "output"} | {"out": "rm"}
    assert not jsonschema.Draft202012Validator(schema("fit-reward")).is_valid(fit)
