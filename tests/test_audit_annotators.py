"""`prefnoise audit --annotators/--votes`: vote encodings, Dawid–Skene, intervals, breakdowns, --fix, bad input."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import prefnoise as pn
from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit import breakdowns as B
from prefnoise.noise_audit import dawid_skene as D
from prefnoise.noise_audit import votes as V
from prefnoise.noise_audit.annotators import TABLE, audit_with_annotators
from prefnoise.options import OptionError
from prefnoise.options.audit import AuditOptions
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree one level deeper finds it one level up)
PANDALM = next(
    (p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if (p / "data" / "real").is_dir()),
    ROOT.parent / "shared",
) / "data" / "real" / "pandalm-dev.jsonl.gz"

# Confusions in the position frame: rows = the first / second shown response is better; columns = votes
# first, second, tie.
BIASED_JUDGE = np.array([[0.92, 0.08, 0.0], [0.28, 0.72, 0.0]])  # favours the first-shown response
HUMAN_A = np.array([[0.80, 0.10, 0.10], [0.05, 0.85, 0.10]])
HUMAN_B = np.array([[0.75, 0.20, 0.05], [0.15, 0.80, 0.05]])


def simulate(n: int, judge: np.ndarray, humans: list[np.ndarray], seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """A table oriented by ``judge``'s votes (ties never), the humans' votes as columns h0, h1, ... and
    ``shown_first``; and whether each table label is wrong."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.45).astype(int)  # 1: the second-shown response is better

    def draw(confusion: np.ndarray) -> np.ndarray:
        return (rng.random(n)[:, None] > confusion[truth].cumsum(axis=1)).sum(axis=1)

    chosen_first = draw(judge) == 0
    columns: dict[str, object] = {
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt": ["q"] * n,
        "chosen": [f"response {i} chosen" for i in range(n)],
        "rejected": [f"response {i} rejected" for i in range(n)],
        "shown_first": np.where(chosen_first, "chosen", "rejected"),
    }
    for k, confusion in enumerate(humans):
        vote = draw(confusion)
        columns[f"h{k}"] = np.where(vote == 2, "tie", np.where((vote == 0) == chosen_first, "chosen", "rejected"))
    return pl.DataFrame(columns), (truth == 0) != chosen_first


def flip_rate_given(confusion: np.ndarray) -> np.ndarray:
    """P(wrong | each true class) with a tie counting half."""
    return np.array([confusion[0, 1] + confusion[0, 2] / 2, confusion[1, 0] + confusion[1, 2] / 2])


def codes_of(frame: pl.DataFrame, names: list[str]) -> np.ndarray:
    return V.annotator_columns(frame, names)


# ---- vote encodings -----------------------------------------------------------------------------------


def test_every_accepted_encoding_reads_the_same_votes():
    expected = [V.CHOSEN, V.REJECTED, V.TIE, V.MISSING]
    assert V.vote_codes(pl.Series(["chosen", " Rejected", "TIE", None]), "a").tolist() == expected
    assert V.vote_codes(pl.Series([1, -1, 0, None]), "a").tolist() == expected
    assert V.vote_codes(pl.Series([1.0, -1.0, 0.0, None]), "a").tolist() == expected
    assert V.vote_codes(pl.Series([True, False, None]), "a").tolist() == [V.CHOSEN, V.REJECTED, V.MISSING]


@pytest.mark.parametrize(
    ("values", "bad_row", "shown"),
    [(["chosen", "maybe"], 2, "'maybe'"), ([1, 2], 2, "2"), ([0.5, 1.0], 1, "0.5"), (["", "tie"], 1, "''")],
)
def test_a_vote_outside_the_encodings_names_its_column_and_row(values, bad_row, shown):
    with pytest.raises(PrefnoiseError, match=rf"column 'judge2', row {bad_row}: vote {shown} is not an accepted"):
        V.vote_codes(pl.Series(values), "judge2")


def test_an_annotator_column_without_a_vote_is_refused():
    frame = pl.DataFrame({"a": ["chosen", "tie"], "b": pl.Series([None, None], dtype=pl.String)})
    with pytest.raises(PrefnoiseError, match="annotator column 'b' has no vote on any pair"):
        V.annotator_columns(frame, ["a", "b"])


def test_long_votes_align_with_the_table_and_refuse_unknown_pairs_and_repeats():
    ids = pl.Series(["x", "y", "z"])
    votes = pl.DataFrame({"pair_id": ["z", "x", "x"], "annotator": ["ann", "ann", "bob"], "vote": [1, -1, 0]})
    names, codes = V.long_votes(votes, ids)
    assert names == ["ann", "bob"]
    assert codes.tolist() == [[V.REJECTED, V.TIE], [V.MISSING, V.MISSING], [V.CHOSEN, V.MISSING]]
    unknown = votes.with_columns(pl.Series("pair_id", ["z", "nope", "x"]))
    with pytest.raises(PrefnoiseError, match=r"column 'pair_id', row 2: pair_id 'nope' is not in the table"):
        V.long_votes(unknown, ids)
    repeated = votes.with_columns(pl.Series("annotator", ["ann", "ann", "ann"]))
    with pytest.raises(PrefnoiseError, match=r"row 3: annotator 'ann' votes twice on pair_id 'x'"):
        V.long_votes(repeated, ids)


# ---- the EM's pieces, by hand ---------------------------------------------------------------------------


def test_e_step_is_bayes_rule_over_the_votes_a_pair_has():
    prior = np.array([[[0.8, 0.2]]])
    confusion = np.array([[[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1]]]])
    votes = np.array([[0, V.MISSING], [1, 0], [V.MISSING, V.MISSING]])
    posterior = D.e_step(prior, confusion, D.one_hot(votes))[0]
    assert posterior[0, 0] == pytest.approx(0.8 * 0.9 / (0.8 * 0.9 + 0.2 * 0.1))
    assert posterior[1, 0] == pytest.approx(0.8 * 0.05 * 0.6 / (0.8 * 0.05 * 0.6 + 0.2 * 0.8 * 0.3))
    assert posterior[2].tolist() == pytest.approx([0.8, 0.2])  # no votes: the prior


def test_m_step_counts_with_pseudo_counts_and_pools_classes_when_symmetric():
    votes = np.array([[0], [1], [2]])
    posterior = np.array([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    weights = np.array([[2.0, 2.0, 1.0]])
    prior, confusion, counts = D.m_step(posterior, weights, D.one_hot(votes), 0.5, False)
    assert counts[0, 0].tolist() == [[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    assert prior[0, 0].tolist() == pytest.approx([3.5 / 6, 2.5 / 6])
    assert confusion[0, 0, 0].tolist() == pytest.approx([2.5 / 4.5, 1.5 / 4.5, 0.5 / 4.5])
    _, symmetric, _ = D.m_step(posterior, weights, D.one_hot(votes), 0.5, True)
    # right = (2 + .5) + (1 + .5), wrong = (1 + .5) + (0 + .5), tie = (0 + .5) + (1 + .5); total 8
    assert symmetric[0, 0, 0].tolist() == pytest.approx([4 / 8, 2 / 8, 2 / 8])
    assert symmetric[0, 0, 1].tolist() == pytest.approx([2 / 8, 4 / 8, 2 / 8])


def test_flip_rates_count_a_tie_as_half_and_position_bias_uses_strict_votes():
    counts = np.array([[[6.0, 2.0, 2.0], [1.0, 8.0, 1.0]]])  # one annotator: rows = true class
    rate, given, ties = D.flip_rates(counts)
    assert rate[0] == pytest.approx((2 + 1 + 0.5 * 3) / 20)
    assert given[0].tolist() == pytest.approx([3 / 10, 1.5 / 10])
    assert ties[0] == pytest.approx(3 / 20)
    assert D.position_bias(counts)[0] == pytest.approx(1 / 9 - 2 / 8)


def test_group_rates_weigh_each_pair_by_its_probability_of_being_in_the_group():
    wrong = np.array([0.0, 1.0, 0.5])
    a = np.array([1, 1, 0])  # the rule holds when chosen is better
    b = np.array([0, 1, 1])  # ... and when rejected is better
    positive, negative, n_pos, n_neg = B.group_rates(wrong, np.ones(3), a, b)
    # P(positive) = (1-s)A + sB = 1, 1, .5; P(wrong & positive) = sB = 0, 1, .5
    assert n_pos == pytest.approx(2.5) and positive == pytest.approx(1.5 / 2.5)
    # P(negative) = 0, 0, .5; P(wrong & negative) = s(1-B) = 0, 0, 0
    assert n_neg == pytest.approx(0.5) and negative == pytest.approx(0.0)


# ---- Dawid–Skene on generated votes with known confusions -------------------------------------------------


def test_position_frame_recovers_every_confusion_within_two_points_at_5000_pairs():
    frame, wrong = simulate(5000, BIASED_JUDGE, [HUMAN_A, HUMAN_B], seed=11)
    chosen_first = V.position_codes(frame["shown_first"], "shown_first")
    audit = audit_with_annotators(codes_of(frame, ["h0", "h1"]), ["h0", "h1"], chosen_first=chosen_first,
                                  bootstrap=100, seed=0)
    assert abs(audit.rate - wrong.mean()) < 0.02
    assert audit.noise_rate["low"] <= wrong.mean() <= audit.noise_rate["high"]
    rows = {row["annotator"]: row for row in audit.annotators}
    for name, confusion in ((TABLE, BIASED_JUDGE), ("h0", HUMAN_A), ("h1", HUMAN_B)):
        given = rows[name]["flip_rate_when"]
        assert abs(given["first_better"] - flip_rate_given(confusion)[0]) < 0.02, name
        assert abs(given["second_better"] - flip_rate_given(confusion)[1]) < 0.02, name
        bias = confusion[1, 0] / confusion[1, :2].sum() - confusion[0, 1] / confusion[0, :2].sum()
        assert abs(rows[name]["position_bias"]["rate"] - bias) < 0.03, name
    assert rows[TABLE]["position_bias"]["low"] > 0.1  # the judge's bias is found, with its interval
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(wrong, audit.suspicion) > 0.9


def test_table_frame_recovers_symmetric_annotators_and_the_table_rate():
    symmetric = [np.array([[0.80, 0.12, 0.08], [0.12, 0.80, 0.08]]), np.array([[0.7, 0.25, 0.05], [0.25, 0.7, 0.05]])]
    judge = np.array([[0.85, 0.15, 0.0], [0.15, 0.85, 0.0]])
    frame, wrong = simulate(5000, judge, symmetric + [symmetric[0]], seed=3)
    names = ["h0", "h1", "h2"]
    audit = audit_with_annotators(codes_of(frame, names), names, bootstrap=100, seed=0)
    assert audit.noise_rate["frame"] == "table"
    assert abs(audit.rate - wrong.mean()) < 0.02
    assert audit.noise_rate["low"] <= wrong.mean() <= audit.noise_rate["high"]
    for row, confusion in zip(audit.annotators[1:], symmetric + [symmetric[0]]):
        assert abs(row["flip_rate"]["rate"] - flip_rate_given(confusion).mean()) < 0.02


@pytest.mark.filterwarnings("ignore")  # crowd-kit 1.4.2 uses pandas keywords that pandas 3 deprecates
def test_em_matches_crowd_kit_dawid_skene():
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    import pandas as pd

    no_ties = [np.array([[0.8, 0.2, 0.0], [0.1, 0.9, 0.0]]), np.array([[0.7, 0.3, 0.0], [0.25, 0.75, 0.0]])]
    frame, _ = simulate(600, BIASED_JUDGE, no_ties, seed=5)
    chosen_first = V.position_codes(frame["shown_first"], "shown_first")
    codes = np.column_stack([np.full(frame.height, V.CHOSEN), codes_of(frame, ["h0", "h1"])])
    votes = D.to_frame(codes, chosen_first)
    fit = D.fit_dawid_skene(votes, np.ones(frame.height), pseudo_count=0.0, tolerance=1e-10)
    long = pd.DataFrame(
        [{"worker": k, "task": i, "label": int(votes[i, k])} for i in range(frame.height) for k in range(3)]
    )
    reference = crowdkit.DawidSkene(n_iter=300, tol=1e-12).fit(long)
    assert fit.prior[0, 0].tolist() == pytest.approx(reference.priors_.sort_index().to_list(), abs=1e-4)
    assert fit.posterior[0][:, 0] == pytest.approx(reference.probas_.sort_index()[0].to_numpy(), abs=1e-4)
    for k in range(3):
        errors = reference.errors_.loc[k].sort_index()  # rows: the vote, columns: the true class
        assert fit.confusion[0, k, :, :2].T == pytest.approx(errors.to_numpy(), abs=1e-4)


def test_one_other_annotator_leaves_the_rate_undetermined():
    frame, _ = simulate(300, BIASED_JUDGE, [HUMAN_A], seed=1)
    audit = audit_with_annotators(codes_of(frame, ["h0"]), ["h0"])
    assert audit.rate is None and not audit.identifiable and "at least two annotators" in audit.reason


def test_bootstrap_of_100k_pairs_takes_seconds():
    frame, wrong = simulate(100_000, BIASED_JUDGE, [HUMAN_A, HUMAN_B], seed=2)
    codes = codes_of(frame, ["h0", "h1"])
    chosen_first = V.position_codes(frame["shown_first"], "shown_first")
    started = time.perf_counter()
    audit = audit_with_annotators(codes, ["h0", "h1"], chosen_first=chosen_first, bootstrap=200, seed=0)
    elapsed = time.perf_counter() - started
    assert elapsed < 20, elapsed  # about 1 s on one idle core: the EM runs on vote patterns, not pairs
    assert audit.noise_rate["low"] <= wrong.mean() <= audit.noise_rate["high"]


# ---- breakdowns mirror corrupt's asymmetric rules --------------------------------------------------------


def test_breakdown_by_column_and_by_longer_recover_the_group_rates():
    rng = np.random.default_rng(8)
    n = 6000
    marked = rng.random(n) < 0.5
    better_longer = rng.random(n) < 0.5
    wrong = rng.random(n) < np.where(marked, 0.3, 0.1)  # column:marked, 30% vs 10%
    chosen_longer = better_longer != wrong
    frame = pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt": ["q"] * n,
        "chosen": np.where(chosen_longer, "a long answer", "short"),
        "rejected": np.where(chosen_longer, "short", "a long answer"),
        "marked": marked,
    })
    humans = {}
    for name, accuracy in (("h0", 0.85), ("h1", 0.8), ("h2", 0.9)):
        right = rng.random(n) < accuracy
        humans[name] = np.where(right != wrong, "chosen", "rejected")
    frame = frame.with_columns(**{k: pl.Series(v) for k, v in humans.items()})
    groups = {rule: B.rule_sides(frame, rule) for rule in ("column:marked", "longer")}
    codes = codes_of(frame, list(humans))
    for chosen_first in (None, rng.random(n) < 0.5):  # both frames (the position here says nothing)
        audit = audit_with_annotators(codes, list(humans), groups=groups, chosen_first=chosen_first, bootstrap=100)
        by = {b["rule"]: b for b in audit.breakdowns}
        assert abs(by["column:marked"]["positive"]["rate"] - wrong[marked].mean()) < 0.02
        assert abs(by["column:marked"]["negative"]["rate"] - wrong[~marked].mean()) < 0.02
        assert by["column:marked"]["difference"]["low"] > 0.1
        assert abs(by["longer"]["positive"]["rate"] - wrong[better_longer].mean()) < 0.02
        assert abs(by["longer"]["negative"]["rate"] - wrong[~better_longer].mean()) < 0.02


# ---- options, the CLI and the API -------------------------------------------------------------------------


def test_audit_options_rules():
    assert AuditOptions(annotators="a, b").annotators == ("a", "b")
    with pytest.raises(OptionError, match="needs other annotators"):
        AuditOptions(by=("longer",))
    with pytest.raises(OptionError, match="needs other annotators"):
        AuditOptions(position_col="first")
    with pytest.raises(OptionError, match="unknown rule 'shorter'"):
        AuditOptions(annotators=("a",), by=("shorter",))
    with pytest.raises(OptionError, match="reads no margins"):
        AuditOptions(annotators=("a",), margin_col="m")
    with pytest.raises(OptionError, match="threshold= must be in"):
        AuditOptions(threshold=2.0)


def test_every_audit_option_is_a_cli_option_of_the_same_name():
    import dataclasses

    from prefnoise.cli.audit import audit_command

    cli = set(audit_command.__wrapped__.__code__.co_varnames[: audit_command.__wrapped__.__code__.co_argcount])
    assert {f.name for f in dataclasses.fields(AuditOptions)} <= cli


@pytest.fixture
def voted(tmp_path):
    frame, wrong = simulate(600, BIASED_JUDGE, [HUMAN_A, HUMAN_B], seed=4)
    path = tmp_path / "voted.parquet"
    frame.write_parquet(path)
    return frame, wrong, path


def test_cli_json_has_rate_annotators_breakdowns_and_suspects(voted):
    frame, wrong, path = voted
    result = invoke("audit", path, "--annotators", "h0,h1", "--position-col", "shown_first", "--by", "longer",
                    "--json", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "annotators" and report["noise_rate"]["method"] == "annotators"
    assert report["noise_rate"]["low"] <= wrong.mean() <= report["noise_rate"]["high"]
    assert [row["annotator"] for row in report["annotators"]] == [TABLE, "h0", "h1"]
    assert [b["rule"] for b in report["breakdowns"]] == ["position", "longer"]
    assert set(report["most_suspect"][0]) == {"pair_id", "oof_margin", "suspicion", "consensus"}
    import jsonschema

    schema = json.loads((ROOT / "docs" / "schemas" / "audit.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(report)  # the --json contract holds with annotators
    python = pn.audit(frame, annotators=["h0", "h1"], position_col="shown_first", by="longer", bootstrap=50)
    without_input = {k: v for k, v in report.items() if k not in ("input", "schema_version")}
    assert {k: v for k, v in python.summary.items() if k != "input"} == without_input
    estimate = invoke("audit", path, "--annotators", "h0,h1", "--estimate-only")
    assert estimate.exit_code == 0 and float(estimate.stdout) == pytest.approx(python.estimate.rate, abs=0.05)


def test_fix_swap_turns_the_votes_round_and_drop_removes_suspects(voted, tmp_path):
    frame, _, path = voted
    out = tmp_path / "swapped.parquet"
    result = invoke("audit", path, "--annotators", "h0,h1", "--position-col", "shown_first", "--fix", "swap",
                    "--out", out, "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    swapped = pl.read_parquet(out)
    before = pn.audit(frame, annotators=["h0", "h1"], position_col="shown_first", bootstrap=0).table
    moved = (before["suspicion"] > 0.5).to_numpy()
    assert moved.sum() > 0 and (swapped["chosen"].to_numpy() == before["rejected"].to_numpy())[moved].all()
    flip = {"chosen": "rejected", "rejected": "chosen", "tie": "tie"}
    assert swapped["h0"].to_list() == [flip[v] if m else v for v, m in zip(before["h0"].to_list(), moved)]
    assert swapped["shown_first"].to_list() == [flip[v] if m else v for v, m in
                                                zip(before["shown_first"].to_list(), moved)]
    assert (swapped["suspicion"] <= 0.5).all() and (swapped["consensus"] != "rejected").all()
    again = pn.audit(swapped, annotators=["h0", "h1"], position_col="shown_first", bootstrap=0)
    assert again.estimate.rate < 0.05  # the votes still name the same responses after the swap
    dropped = pn.audit(frame, tmp_path / "dropped.parquet", annotators=["h0", "h1"], fix="drop", bootstrap=0)
    assert dropped.table.height == frame.height - dropped.summary["fixed"]["count"]


def test_fix_refuses_an_undetermined_rate(voted, tmp_path):
    _, _, path = voted
    out = tmp_path / "fixed.parquet"
    result = invoke("audit", path, "--annotators", "h0", "--fix", "drop", "--out", out)
    assert result.exit_code == 4 and "at least two annotators" in result.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"h1": ["chosen", "perhaps"]}, ["column 'h1', row 2: vote 'perhaps'"]),
        ({"h1": [None, None]}, ["annotator column 'h1' has no vote"]),
        ({"shown_first": ["chosen", "tie"]}, ["--position-col: column 'shown_first', row 2"]),
    ],
)
def test_bad_votes_are_one_line_errors_and_nothing_is_written(tmp_path, change, fragments):
    frame = pl.DataFrame({"pair_id": ["a", "b"], "prompt": ["q", "q"], "chosen": ["x", "y"], "rejected": ["z", "w"],
                          "h0": ["chosen", "tie"], "h1": ["rejected", "chosen"], "shown_first": ["chosen", "chosen"]})
    frame = frame.with_columns(**{k: pl.Series(k, v, dtype=pl.String) for k, v in change.items()})
    path, out = tmp_path / "t.parquet", tmp_path / "out.parquet"
    frame.write_parquet(path)
    result = invoke("audit", path, "--annotators", "h0,h1", "--position-col", "shown_first", "--out", out)
    assert_one_line_error(result, *fragments)
    assert_nothing_written(out)


def test_votes_naming_unknown_pairs_are_one_line_errors(voted, tmp_path):
    _, _, path = voted
    votes = pl.DataFrame({"pair_id": ["p0", "p1", "ghost"], "annotator": ["a", "a", "b"], "vote": [1, 0, -1]})
    votes.write_csv(tmp_path / "votes.csv")
    out = tmp_path / "out.parquet"
    result = invoke("audit", path, "--votes", tmp_path / "votes.csv", "--out", out)
    assert_one_line_error(result, "column 'pair_id', row 3: pair_id 'ghost' is not in the table")
    assert_nothing_written(out)


def test_long_votes_give_the_same_audit_as_columns(voted, tmp_path):
    frame, _, path = voted
    long = frame.select("pair_id", "h0", "h1").unpivot(index="pair_id", variable_name="annotator", value_name="vote")
    long.write_csv(tmp_path / "votes.csv")
    by_columns = pn.audit(frame, annotators="h0,h1", bootstrap=20, seed=1)
    by_votes = pn.audit(frame, votes=tmp_path / "votes.csv", bootstrap=20, seed=1)
    assert by_votes.estimate.noise_rate == by_columns.estimate.noise_rate
    assert by_votes.table["suspicion"].to_list() == by_columns.table["suspicion"].to_list()


# ---- PandaLM, end to end -------------------------------------------------------------------------------------


def pandalm_table() -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """The dev slice as a table oriented by the GPT-3.5 judge (judge ties/garbage and empty or identical
    responses dropped), humans 1-3 as vote columns, ``shown_first``; and per pair the 2-of-3 human majority
    (1: response1, 2: response2, 0: none) and the judge's verdict."""
    rows = [json.loads(line) for line in gzip.open(PANDALM, "rt")]
    kept, majority, judge = [], [], []
    for row in rows:
        first, second = row["response1"], row["response2"]
        if row["gpt35_result"] not in ("1", "2") or not all(isinstance(r, str) and r.strip() for r in (first, second)):
            continue
        if first == second:
            continue
        verdict = int(row["gpt35_result"])
        humans = [row[f"annotator{k}"] for k in (1, 2, 3)]
        vote = {0: "tie", verdict: "chosen", 3 - verdict: "rejected"}
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        kept.append({
            "pair_id": str(row["idx"]), "prompt": prompt,
            "chosen": first if verdict == 1 else second, "rejected": second if verdict == 1 else first,
            **{f"annotator{k}": vote[h] for k, h in zip((1, 2, 3), humans)},
            "shown_first": "chosen" if verdict == 1 else "rejected",
        })
        majority.append(1 if humans.count(1) >= 2 else 2 if humans.count(2) >= 2 else 0)
        judge.append(verdict)
    return pl.DataFrame(kept), np.array(majority), np.array(judge)


@pytest.mark.skipif(not PANDALM.exists(), reason="the shared real data is not on this machine")
@pytest.mark.parametrize("position", [True, False])
def test_pandalm_two_humans_find_the_judges_rate_and_mistakes(position):
    from sklearn.metrics import roc_auc_score

    table, majority, judge = pandalm_table()
    decided = majority > 0
    judge_wrong = majority != judge
    result = pn.audit(table, annotators=["annotator1", "annotator2"], bootstrap=500, seed=0,
                      position_col="shown_first" if position else None)
    rate = result.summary["noise_rate"]
    assert table.height == 338 and decided.sum() == 310
    assert rate["low"] <= judge_wrong[decided].mean() <= rate["high"]  # 0.158 (49 of 310)
    suspicion = result.table["suspicion"].to_numpy()
    assert roc_auc_score(judge_wrong[decided], suspicion[decided]) >= 0.95


# ---- reusing an earlier audit's margins -------------------------------------------------------------------


def test_an_audit_output_feeds_margin_col_oof_margin(tmp_path):
    """`--margin-col oof_margin` on an audit's --out reads the same margins: with one refit the estimate
    is identical, and no fold model is fitted again."""
    from prefnoise.data import canonicalize
    from prefnoise.noise import NoiseSpec, corrupt_frame
    from tests.conftest import make_feature_pairs

    clean = canonicalize(make_feature_pairs(1500, seed=4))[0]
    noisy, _ = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.2, seed=1))
    data, audited = tmp_path / "noisy.parquet", tmp_path / "audited.parquet"
    noisy.write_parquet(data)
    options = ["--bootstrap", "20", "--json"]
    fold_models = ["--folds", "3", "--epochs", "10", "--hidden", "32", "--refits", "1", "--lr", "0.003"]
    first = invoke("audit", data, *fold_models, "--out", audited, *options)
    assert first.exit_code == 0, first.output
    again = invoke("audit", audited, "--margin-col", "oof_margin", *options)
    assert again.exit_code == 0, again.output
    before, after = json.loads(first.stdout)["noise_rate"], json.loads(again.stdout)["noise_rate"]
    assert before["rate"] is not None
    assert (after["rate"], after["low"], after["high"]) == (before["rate"], before["low"], before["high"])


def test_breakdowns_with_gold_count_the_gold_pairs_exactly():
    """With --gold, a group's rate is the share of gold pairs in it whose gold vote says the label is wrong
    (a gold tie is left out); the position group of a wrong pair is the rejected response's position."""
    rng = np.random.default_rng(0)
    n = 400
    gold = np.full(n, None, dtype=object)
    gold[:120] = rng.choice(["chosen", "rejected", "tie"], 120, p=[0.7, 0.25, 0.05])
    marked = rng.random(n) < 0.5
    first = rng.random(n) < 0.5
    frame = pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)], "prompt": ["q"] * n, "chosen": ["a"] * n, "rejected": ["b"] * n,
        "m": rng.normal(1.0, 1.0, n), "g": pl.Series(gold.tolist(), dtype=pl.String), "marked": marked,
        "shown_first": np.where(first, "chosen", "rejected"),
    })
    result = pn.audit(frame, margin_col="m", gold="g", by="column:marked", position_col="shown_first", bootstrap=50)
    by = {b["rule"]: b for b in result.summary["breakdowns"]}
    import jsonschema

    schema = json.loads((ROOT / "docs" / "schemas" / "audit.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate({**result.summary, "schema_version": 1})  # the contract holds
    wrong, strict = gold == "rejected", np.isin(gold, ["chosen", "rejected"])
    assert by["column:marked"]["positive"]["rate"] == pytest.approx(wrong[strict & marked].mean())
    assert by["column:marked"]["negative"]["rate"] == pytest.approx(wrong[strict & ~marked].mean())
    assert by["column:marked"]["positive"]["pairs"] == (strict & marked).sum()
    better_first = np.where(wrong, ~first, first)
    assert by["position"]["positive"]["rate"] == pytest.approx(wrong[strict & better_first].mean())
    assert by["position"]["positive"]["low"] <= by["position"]["positive"]["rate"] <= by["position"]["positive"]["high"]
