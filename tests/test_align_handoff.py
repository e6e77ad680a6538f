"""`align --loss rdpo|cdpo --noise-rate-from AUDIT.json`: the audit's estimate becomes ε, and the run records
the estimate and its interval; an undetermined audit is refused with its reason."""

from __future__ import annotations

import json

import pytest
from tiny_models import pattern_pairs

from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit.handoff import AuditEstimate, read_audit_estimate
from prefnoise.options import OptionError
from prefnoise.options.align import AlignConfig
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke

SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu", "--batch-size", "8"]


def audit_file(tmp_path, **noise_rate) -> str:
    path = tmp_path / "audit.json"
    estimate = {"rate": 0.18, "low": 0.12, "high": 0.25, "method": "annotators", **noise_rate}
    path.write_text(json.dumps({"schema_version": 1, "noise_rate": estimate}))
    return str(path)


def test_the_estimate_and_its_interval_are_read(tmp_path):
    got = read_audit_estimate(audit_file(tmp_path))
    assert got == AuditEstimate(0.18, 0.12, 0.25, "annotators", str(tmp_path / "audit.json"))
    assert got.provenance() == {"rate": 0.18, "low": 0.12, "high": 0.25, "method": "annotators",
                                "path": str(tmp_path / "audit.json")}


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such audit file"),
    ("not json", "not a JSON object"),
    ('{"pairs": 3}', "no noise_rate object with a rate"),
    ('{"noise_rate": {"rate": null, "reason": "fold models at chance"}}',
     "left the flip rate undetermined (fold models at chance)"),
    ('{"noise_rate": {"rate": 0.6}}', "outside [0, 0.5)"),
    ('{"noise_rate": {"rate": "0.2"}}', "not a number"),
])
def test_what_is_not_a_usable_estimate_is_one_line(tmp_path, content, message):
    path = tmp_path / "audit.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PrefnoiseError, match="^" + str(path).replace(".", r"\.") + ": ") as raised:
        read_audit_estimate(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_option_belongs_to_the_losses_that_need_a_rate():
    AlignConfig(model="m", out="o", loss="rdpo", noise_rate_from="a.json")  # no noise_rate: the file gives it
    with pytest.raises(OptionError, match="noise_rate_from= applies to the losses that need a flip rate"):
        AlignConfig(model="m", out="o", loss="sympo", noise_rate_from="a.json")
    with pytest.raises(OptionError, match="noise_rate="):
        AlignConfig(model="m", out="o", loss="rdpo")  # still required without the file


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pattern_pairs(32, seed=8).write_parquet(path)
    return path


def test_rdpo_takes_eps_from_the_audit_and_records_it(lm_path, data_path, tmp_path):
    audit = audit_file(tmp_path)
    out = tmp_path / "run"
    done = invoke("align", data_path, "--model", lm_path, "--out", out, "--loss", "rdpo", "--noise-rate-from", audit,
                  "--max-steps", "1", "--json", *SMALL)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["eps"] == 0.18 and summary["loss_params"]["eps"] == 0.18
    assert summary["noise_rate_from"] == {"rate": 0.18, "low": 0.12, "high": 0.25, "method": "annotators",
                                          "path": audit}
    assert json.loads((out / "summary.json").read_text())["noise_rate_from"]["high"] == 0.25


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--loss", "rdpo"], ("left the flip rate undetermined (too few pairs)", "--annotators or --gold")),
    (["--loss", "rdpo", "--noise-rate", "0.1"], ("--noise-rate and --noise-rate-from both give ε",)),
    (["--loss", "sympo"], ("--noise-rate-from applies to --loss cdpo or rdpo, not --loss sympo",)),
])
def test_bad_hand_offs_are_one_line_exit_2_nothing_written(lm_path, data_path, tmp_path, extra, fragments):
    audit = audit_file(tmp_path, rate=None, reason="too few pairs")
    out = tmp_path / "run"
    done = invoke("align", data_path, "--model", lm_path, "--out", out, "--noise-rate-from", audit, *extra, *SMALL)
    assert done.exit_code == 2, done.output
    assert_one_line_error(done, *fragments)
    assert_nothing_written(out)

