"""Issue "Real text, faithfully": HH splits that rebuild the transcripts (and agree with TRL),
per-response struct fields that travel on a flip, independent repeated corruption, and an
explicit --true that must exist."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise import columns as C
from prefnoise.cli import app
from prefnoise.data import HH_ASSISTANT, canonicalize, open_source, read_history
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics import rank_report
from prefnoise.noise import NoiseSpec, corrupt_frame, corrupt_step, swap_responses
from tests.conftest import REAL_HH, make_pairs

REAL = REAL_HH.parent
UF_TRL = REAL / "ultrafeedback-binarized-trl-train1000.jsonl.gz"
runner = CliRunner()


def _raw_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------- 1. HH transcripts


def test_hh_split_rebuilds_every_valid_transcript_and_matches_trl(real_hh_path):
    trl_data_utils = pytest.importorskip("trl.data_utils")
    raw = _raw_rows(real_hh_path)
    src = open_source(real_hh_path, layout="hh", drop_invalid=True)
    table = src.collect()
    assert src.dropped == {"null or empty 'chosen'": 4}  # the 5 "prefixes differ" rows are kept now
    assert table.height == len(raw) - 4 == 2308
    prompts, chosens, rejecteds = table["prompt"].to_list(), table["chosen"].to_list(), table["rejected"].to_list()
    matched = skipped = trl_exact = 0
    for row in raw:
        trl = trl_data_utils.extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
        if matched < table.height and prompts[matched] + chosens[matched] == row["chosen"]:
            i = matched
            assert prompts[i] + rejecteds[i] == row["rejected"]  # byte for byte, both sides
            # TRL's character-level prefix, cut back to its last assistant marker, is our prompt.
            assert prompts[i] == trl["prompt"][: trl["prompt"].rfind(HH_ASSISTANT) + len(HH_ASSISTANT)]
            assert trl["prompt"].startswith(prompts[i])
            trl_exact += prompts[i] == trl["prompt"]
            matched += 1
        else:
            skipped += 1
            tail = row["chosen"][row["chosen"].rfind(HH_ASSISTANT) + len(HH_ASSISTANT) :]
            assert tail.strip() == ""  # only the empty final replies are left out
    assert (matched, skipped) == (2308, 4)
    # Where TRL's prompt ends at a turn boundary (it does not when both replies start alike,
    # e.g. " I ..."), it is exactly ours.
    assert trl_exact == 1863
    assert all(p.endswith(HH_ASSISTANT) for p in prompts)
    assert all(c.startswith(" ") for c in chosens)


def test_hh_pairs_whose_final_turns_differ_keep_the_shared_turns(tmp_path):
    row = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: bx",
    }
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"chosen": "\n\nHuman: q", "rejected": "x"}) + "\n")
    src = open_source(path, layout="hh", drop_invalid=True)
    table = src.collect()
    assert src.dropped == {"transcript prefixes differ": 1}  # no shared prefix ending in "\n\nAssistant:"
    assert table.row(0, named=True) | {"pair_id": None} == {
        "pair_id": None,
        "prompt": "\n\nHuman: a\n\nAssistant:",
        "chosen": " b\n\nHuman: c\n\nAssistant: d",
        "rejected": " bx",
    }


# --------------------------------------------------------------------------- 2. struct fields


def _uf_table():
    if not UF_TRL.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    src = open_source(UF_TRL, drop_invalid=True)
    table = src.collect()
    assert table.height == 1000 - sum(src.dropped.values())
    return table


def _score_of_text(table):
    meta = table["metadata"].struct.unnest()
    return {
        **{(p, t): s for p, t, s in zip(table[C.PAIR_ID], table[C.CHOSEN], meta["score_chosen"], strict=True)},
        **{(p, t): s for p, t, s in zip(table[C.PAIR_ID], table[C.REJECTED], meta["score_rejected"], strict=True)},
    }


def test_corrupt_swaps_nested_scores_with_their_text_on_real_ultrafeedback():
    clean = _uf_table()
    noisy, stats = corrupt_frame(clean, NoiseSpec(rate=0.3, seed=7))
    assert 220 <= stats.flips <= 380
    truth = _score_of_text(clean)
    meta = noisy["metadata"].struct.unnest()
    rows = zip(noisy[C.PAIR_ID], noisy[C.CHOSEN], noisy[C.REJECTED], meta["score_chosen"], meta["score_rejected"])
    for pair_id, chosen, rejected, score_chosen, score_rejected in rows:
        assert truth[(pair_id, chosen)] == score_chosen
        assert truth[(pair_id, rejected)] == score_rejected
    flipped = noisy["flipped"].to_numpy()
    # flipped pairs now mostly rank the lower-scored text first (ties aside)
    margin = (meta["score_chosen"] - meta["score_rejected"]).to_numpy()
    assert (margin[flipped] <= 0).all() and (margin[~flipped] >= 0).all()
    assert meta.columns == clean["metadata"].struct.unnest().columns


def test_corrupt_cli_keeps_real_ultrafeedback_scores_with_their_text(tmp_path):
    clean = _uf_table()
    out = tmp_path / "noisy.parquet"
    result = runner.invoke(app, ["corrupt", str(UF_TRL), str(out), "--rate", "0.3", "--seed", "3", "--drop-invalid"])
    assert result.exit_code == 0, result.output
    noisy = pl.read_parquet(out)
    assert noisy["flipped"].sum() > 200
    truth = _score_of_text(clean)
    meta = noisy["metadata"].struct.unnest()
    for pair_id, chosen, score in zip(noisy[C.PAIR_ID], noisy[C.CHOSEN], meta["score_chosen"], strict=True):
        assert truth[(pair_id, chosen)] == score


def test_struct_naming_rule_and_nesting():
    assert C.struct_partner("score_chosen", ["score_chosen", "score_rejected"]) == "score_rejected"
    assert C.struct_partner("chosen_model", ["chosen_model", "rejected_model"]) == "rejected_model"
    assert C.struct_partner("rejected_model", ["chosen_model", "rejected_model"]) == "chosen_model"
    assert C.struct_partner("chosen_model", ["chosen_model"]) is None
    assert C.struct_partner("source", ["source"]) is None
    frame = pl.DataFrame(
        {
            "prompt": ["p", "q"],
            "chosen": ["a", "b"],
            "rejected": ["x", "y"],
            "meta": [{"src": "s", "deep": {"chosen_m": "A", "rejected_m": "X"}}, None],
        }
    )
    out = swap_responses(frame, np.array([True, False]))
    assert out["meta"].to_list() == [{"src": "s", "deep": {"chosen_m": "X", "rejected_m": "A"}}, None]


# --------------------------------------------------------------------------- 3. repeated corruption


def _wrong(n, rates, steps, seed=5):
    frame, _ = canonicalize(make_pairs(n, scores=False))
    for rate, step in zip(rates, steps, strict=True):
        frame, _ = corrupt_frame(frame, NoiseSpec(rate=rate, seed=seed, step=step))
    return frame


@pytest.mark.parametrize(("rates", "expected"), [((0.2, 0.4), 0.44), ((0.3, 0.3), 0.42)])
def test_independent_steps_compose(rates, expected):
    n = 5000
    frame = _wrong(n, rates, (0, 1))
    wrong = frame["flipped"].mean()
    assert abs(wrong - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert expected == pytest.approx(rates[0] + rates[1] - 2 * rates[0] * rates[1])
    assert _wrong(n, rates, (0, 1)).equals(frame)  # deterministic


def test_same_step_reuses_draws_and_cancels():
    assert not _wrong(2000, (0.3, 0.3), (0, 0))["flipped"].any()


def test_corrupt_step_counts_earlier_corrupt_steps(tmp_path):
    assert corrupt_step([]) == 0
    assert corrupt_step([{"command": "import"}, {"command": "corrupt"}, {"command": "score"}]) == 1
    assert NoiseSpec(rate=0.1, step=2).parameters()["step"] == 2
    assert "step" not in NoiseSpec(rate=0.1).parameters()
    with pytest.raises(PrefnoiseError, match="step"):
        NoiseSpec(rate=0.1, step=-1).check()
    data = tmp_path / "d.parquet"
    make_pairs(50).write_parquet(data)
    once = tmp_path / "once.parquet"
    assert runner.invoke(app, ["corrupt", str(data), str(once), "--rate", "0.3"]).exit_code == 0
    assert corrupt_step(read_history(once)) == 1


# --------------------------------------------------------------------------- 4. explicit --true


def _scored(tmp_path):
    frame = make_pairs(60).with_columns(
        (pl.col("chosen_score") + 0.1).alias("chosen_reward"), (pl.col("rejected_score") - 0.1).alias("rejected_reward")
    )
    path = tmp_path / "d.parquet"
    frame.write_parquet(path)
    return frame, path


def test_explicit_true_that_is_missing_is_an_error(tmp_path):
    frame, path = _scored(tmp_path)
    with pytest.raises(PrefnoiseError, match="--true scroe: no column 'chosen_scroe' or 'rejected_scroe'"):
        rank_report(frame, true="scroe", n_boot=0)
    with pytest.raises(PrefnoiseError, match="no column 'rejected_score'"):
        rank_report(frame.drop("rejected_score"), n_boot=0)  # half a true reward is never the labels
    result = runner.invoke(app, ["rank-check", str(path), "--true", "scroe", "--min-agreement", "0.5"])
    assert result.exit_code == 2
    assert "scroe" in result.output


def test_default_true_falls_back_to_labels_and_says_so(tmp_path):
    frame, _ = _scored(tmp_path)
    labels_only = frame.drop("chosen_score", "rejected_score")
    report = rank_report(labels_only, true=None, n_boot=0)
    assert report.reference == "labels" and report.true is None
    assert report.note == "no chosen_score/rejected_score columns: the labels are the reference"
    with pytest.raises(PrefnoiseError, match="--true score: no column 'chosen_score'"):
        rank_report(labels_only, true="score", n_boot=0)  # named explicitly, so it must exist
    scored = rank_report(frame, n_boot=0)
    assert scored.reference == "score" and scored.note is None and scored.overall.agreement.value == 1.0
