"""The flip rate of a table's labels from other annotators' votes: Dawid–Skene, per-annotator rates,
per-pair suspicion and consensus, and breakdowns by group — each with a bootstrap interval.

The table's own orientation is the label under audit (``chosen`` is what it preferred). The votes are
read by :mod:`prefnoise.noise_audit.votes` and fitted by :mod:`prefnoise.noise_audit.dawid_skene`
(see there for the two frames). The interval of every rate is the 2.5–97.5% percentile of a pair
bootstrap that refits the EM on each resample.

Ties: a vote of "tie" is evidence like any other vote in the EM (each annotator has its own tie
probabilities per true class), and in an annotator's flip rate a tie counts as half a flip: it prefers
neither response, so whichever is better it is half wrong (the rule prefnoise uses wherever a tie
meets a preference). The table's own labels are never ties.

When is the rate undetermined? With one other annotator the EM cannot tell that annotator's mistakes
from the table's (the table frame has more unknowns than vote patterns), so at least two annotators
are needed, and at least ``MIN_SHARED_PAIRS`` pairs carrying votes from two or more of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefnoise.noise_audit import breakdowns as B
from prefnoise.noise_audit import dawid_skene as D
from prefnoise.noise_audit.votes import CHOSEN, MISSING

TABLE = "(table)"  # the table's own label, in the per-annotator table
MIN_SHARED_PAIRS = 10
TIE_RULE = "a tie vote counts as half a flip in an annotator's flip rate; the table's labels are never ties"


@dataclass
class AnnotatorAudit:
    """The table's flip rate (``noise_rate``: rate, low, high, method, ...), the per-annotator table, the
    breakdowns, and per pair ``suspicion`` (P(the table's label is wrong)) and ``consensus`` (the response
    the posterior prefers: "chosen", "rejected", or "tie" at exactly ½); None when undetermined."""

    noise_rate: dict[str, Any]
    annotators: list[dict[str, Any]] = field(default_factory=list)
    breakdowns: list[dict[str, Any]] = field(default_factory=list)
    suspicion: np.ndarray | None = None
    consensus: np.ndarray | None = None

    @property
    def rate(self) -> float | None:
        """The table's flip rate (None when undetermined)."""
        return self.noise_rate["rate"]

    @property
    def identifiable(self) -> bool:
        """Whether the votes determine the rate."""
        return self.noise_rate["identifiable"]

    @property
    def reason(self) -> str | None:
        """Why the rate is undetermined (None when it is not)."""
        return self.noise_rate["reason"]

    def to_dict(self) -> dict[str, Any]:
        """``noise_rate`` as JSON."""
        return dict(self.noise_rate)


def undetermined_reason(codes: np.ndarray, names: list[str]) -> str | None:
    """Why these votes cannot determine the table's flip rate (None when they can)."""
    if len(names) < 2:
        return (
            f"one other annotator ({names[0]}) cannot tell its own mistakes from the table's: "
            "give at least two annotators (columns or --votes)"
        )
    shared = int(((codes != MISSING).sum(axis=1) >= 2).sum())
    if shared < MIN_SHARED_PAIRS:
        return (
            f"only {shared} pairs have votes from two or more annotators, at least {MIN_SHARED_PAIRS} are "
            "needed to tell the annotators' mistakes from the table's"
        )
    return None


def _patterns(
    votes: np.ndarray, sides: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of (votes, group sides): (patterns, each pair's pattern, pairs per pattern)."""
    key = np.column_stack([votes, *[np.column_stack(side) for side in sides]]).astype(np.int8)
    patterns, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    return patterns, inverse.reshape(-1), counts


def _concatenate(fits: list[D.DawidSkeneFit]) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap fits' posteriors (B, P, 2) and counts (B, K, 2, 3), batches joined."""
    return np.concatenate([f.posterior for f in fits]), np.concatenate([f.counts for f in fits])


def _rate(point: float, draws: np.ndarray | None) -> dict[str, float | None]:
    low, high = D.percentile_interval(draws) if draws is not None else (None, None)
    return {"rate": None if np.isnan(point) else float(point), "low": low, "high": high}


def annotator_rows(
    names: list[str], annotated: np.ndarray, counts: np.ndarray, draws: np.ndarray | None, position: bool
) -> list[dict[str, Any]]:
    """One row per annotator: pairs annotated, flip rate with interval, tie share, and in the position
    frame the flip rate given each true class and the position bias with its interval."""
    rate, given, ties = D.flip_rates(counts)
    draw_rates = D.flip_rates(draws)[0] if draws is not None else None
    bias = D.position_bias(counts) if position else None
    draw_bias = D.position_bias(draws) if position and draws is not None else None
    rows = []
    for k, name in enumerate(names):
        row: dict[str, Any] = {
            "annotator": name,
            "pairs": int(annotated[k]),
            "flip_rate": _rate(rate[k], None if draw_rates is None else draw_rates[:, k]),
            "tie_rate": float(ties[k]),
            "flip_rate_when": None,
            "position_bias": None,
        }
        if position:
            row["flip_rate_when"] = {"first_better": float(given[k, 0]), "second_better": float(given[k, 1])}
            row["position_bias"] = _rate(bias[k], None if draw_bias is None else draw_bias[:, k])
        rows.append(row)
    return rows


def _stratified_rates(
    votes: np.ndarray,
    counts: np.ndarray,
    table_class: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    position: bool,
    bootstrap: int,
    seed: int,
    pseudo_count: float,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...] | None]:
    """One breakdown's group rates (point, bootstrap draws) from an EM whose prior is fitted per stratum
    (the table's label × the rule's sides): with one prior for all pairs, every posterior would be pulled
    toward the overall rate and the groups' rates toward each other. The stratum holds the table's label,
    so its vote leaves the EM (counted twice, it would drive every stratum to agree with the table)."""
    strata = 4 * table_class.astype(np.int64) + 2 * a.astype(np.int64) + b.astype(np.int64)
    strata = np.unique(strata, return_inverse=True)[1].reshape(-1)
    votes = votes[:, 1:] if position else votes
    fit = D.fit_dawid_skene(votes, counts, symmetric=not position, strata=strata, pseudo_count=pseudo_count)
    point = B.group_rates(D.wrong_label_probability(fit.posterior, table_class)[0], counts, a, b)
    if bootstrap <= 0:
        return point, None
    weights, fits = D.bootstrap_fits(
        votes, counts, bootstrap, seed, symmetric=not position, pseudo_count=pseudo_count, strata=strata
    )
    wrong = D.wrong_label_probability(_concatenate(fits)[0], table_class)
    return point, B.group_rates(wrong, weights, a, b)


def audit_with_annotators(
    codes: np.ndarray,
    names: list[str],
    *,
    chosen_first: np.ndarray | None = None,
    groups: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    pseudo_count: float = D.PSEUDO_COUNT,
) -> AnnotatorAudit:
    """Audit the table's labels with other annotators' vote ``codes`` (pairs × annotators, see
    :mod:`~prefnoise.noise_audit.votes`): the position frame when ``chosen_first`` is given, else the
    table frame; ``groups`` maps a rule to its sides (A, B) (see :mod:`~prefnoise.noise_audit.breakdowns`)."""
    pairs = codes.shape[0]
    position = chosen_first is not None
    base: dict[str, Any] = {
        "method": "annotators", "pairs": pairs, "annotators": len(names), "frame": "position" if position else "table",
        "pseudo_count": pseudo_count, "tie_rule": TIE_RULE,
    }
    reason = undetermined_reason(codes, names)
    if reason is not None:
        undetermined = {"rate": None, "low": None, "high": None, "identifiable": False, "reason": reason}
        return AnnotatorAudit({**undetermined, **base})
    votes = D.to_frame(np.column_stack([np.full(pairs, CHOSEN), codes]), chosen_first) if position else codes
    named_sides = ([(B.POSITION, B.position_sides(chosen_first))] if position else []) + list((groups or {}).items())
    patterns, inverse, counts = _patterns(votes, [sides for _, sides in named_sides])
    pattern_votes = patterns[:, : votes.shape[1]]
    table_class = pattern_votes[:, 0] if position else np.zeros(len(patterns), dtype=np.int8)
    fit = D.fit_dawid_skene(pattern_votes, counts, symmetric=not position, pseudo_count=pseudo_count)
    wrong = D.wrong_label_probability(fit.posterior, table_class)[0]
    weights = draw_wrong = draw_counts = None
    if bootstrap > 0:
        weights, fits = D.bootstrap_fits(
            pattern_votes, counts, bootstrap, seed, symmetric=not position, pseudo_count=pseudo_count
        )
        draw_posterior, draw_counts = _concatenate(fits)
        draw_wrong = D.wrong_label_probability(draw_posterior, table_class)
    draw_rates = None if weights is None else (draw_wrong * weights).sum(axis=1) / pairs
    noise = _rate(float((wrong * counts).sum() / pairs), draw_rates)
    noise_rate = {**noise, "identifiable": True, "reason": None, **base,
                  "iterations": fit.iterations, "converged": fit.converged}
    annotated = np.concatenate([[pairs], (codes != MISSING).sum(axis=0)]) if position else (codes != MISSING).sum(0)
    rows = annotator_rows([TABLE, *names] if position else names, annotated, fit.counts[0], draw_counts, position)
    if not position:
        rows.insert(0, {"annotator": TABLE, "pairs": pairs, "flip_rate": noise, "tie_rate": 0.0,
                        "flip_rate_when": None, "position_bias": None})
    breakdowns = []
    for j, (rule, _) in enumerate(named_sides):
        a, b = patterns[:, votes.shape[1] + 2 * j], patterns[:, votes.shape[1] + 2 * j + 1]
        if rule == B.POSITION:  # the position frame's classes are the groups: the main fit serves
            point = B.group_rates(wrong, counts, a, b)
            draws = None if weights is None else B.group_rates(draw_wrong, weights, a, b)
        else:
            point, draws = _stratified_rates(pattern_votes, counts, table_class, a, b, position, bootstrap, seed,
                                             pseudo_count)
        breakdowns.append(B.summarize(rule, point, draws))
    consensus = np.where(wrong < 0.5, "chosen", np.where(wrong > 0.5, "rejected", "tie"))
    return AnnotatorAudit(noise_rate, rows, breakdowns, wrong[inverse], consensus[inverse])
