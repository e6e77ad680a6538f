"""Flip rates of the table's labels per group of pairs (length bias, position bias, any column), with intervals.

A group is defined as corrupt's asymmetric rules define the pairs they flip: by what holds for the
*better* response. ``--by longer`` splits the pairs by whether the better response is the longer one;
position by whether it was shown first; ``compare:NAME`` by whether chosen_NAME > rejected_NAME holds
once the better response is in ``chosen``; ``column:NAME`` by the column's value (a property of the
pair, which swapping does not change). The truth is not known, so a pair counts in each group with its
probability: if the rule holds when ``chosen`` is the better response (A) and when ``rejected`` is (B),
and s is the probability that the table's label is wrong,

    P(positive) = (1 − s)·A + s·B,  P(label wrong and positive) = s·B,

and the group's flip rate is Σ s·B / Σ P(positive) (the negative group alike with 1 − A, 1 − B). The
length-bias reading: the judge's error rate when the longer answer is the wrong one is the negative
group's rate of ``--by longer`` (the better one is not the longer), when it is the right one the
positive group's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from prefnoise.noise import positive_pairs, swap_responses

POSITION = "position"


def rule_sides(frame: pl.DataFrame, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) for an orientation rule of corrupt's (``longer``, ``column:NAME``, ``compare:NAME``): whether it
    holds for the pair when ``chosen`` is the better response, and when ``rejected`` is."""
    swapped = swap_responses(frame, np.ones(frame.height, dtype=bool))
    return positive_pairs(frame, rule), positive_pairs(swapped, rule)


def position_sides(chosen_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) for the position group "the better response was shown first"."""
    first = np.asarray(chosen_first, dtype=bool)
    return first, ~first


def group_rates(
    wrong: np.ndarray, weights: np.ndarray, if_chosen: np.ndarray, if_rejected: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``wrong``/``weights`` (…, pairs or patterns): the flip rate in the positive and the negative
    group, and each group's expected size (see the module docstring)."""
    a = np.asarray(if_chosen, dtype=np.float64)
    b = np.asarray(if_rejected, dtype=np.float64)
    wrong = np.asarray(wrong, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    positive = (weights * ((1 - wrong) * a + wrong * b)).sum(axis=-1)
    negative = (weights * ((1 - wrong) * (1 - a) + wrong * (1 - b))).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_positive = (weights * wrong * b).sum(axis=-1) / positive
        rate_negative = (weights * wrong * (1 - b)).sum(axis=-1) / negative
    return rate_positive, rate_negative, positive, negative


def describe(rule: str) -> tuple[str, str]:
    """Words for the positive and the negative group of ``rule``."""
    if rule == "longer":
        return "the better response is the longer", "the better response is not the longer"
    if rule == POSITION:
        return "the better response was shown first", "the better response was shown second"
    kind, _, name = rule.partition(":")
    if kind == "compare":
        return f"the better response has the larger {name}", f"the better response does not have the larger {name}"
    return f"{name} is true", f"{name} is false"


def summarize(
    rule: str, point: tuple[np.ndarray, ...], draws: tuple[np.ndarray, ...] | None
) -> dict[str, Any]:
    """The JSON object of one breakdown: each group's rate, 95% interval and expected pairs, and the
    difference positive − negative with its interval (from bootstrap ``draws``, or None without)."""
    words = describe(rule)
    out: dict[str, Any] = {"rule": rule}
    for index, side in enumerate(("positive", "negative")):
        rate = float(point[index])
        low, high = _interval(draws[index]) if draws is not None else (None, None)
        out[side] = {
            "group": words[index],
            "rate": None if np.isnan(rate) else rate,
            "low": low,
            "high": high,
            "pairs": float(point[2 + index]),
        }
    difference = float(point[0] - point[1])
    low, high = _interval(draws[0] - draws[1]) if draws is not None else (None, None)
    out["difference"] = {"rate": None if np.isnan(difference) else difference, "low": low, "high": high}
    return out


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None, None
    return float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))


def bootstrap_breakdown(
    rule: str, wrong: np.ndarray, if_chosen: np.ndarray, if_rejected: np.ndarray, *, draws: int, seed: int
) -> dict[str, Any]:
    """One breakdown from per-pair probabilities (or 0/1 indicators, e.g. on gold pairs) that the label is
    wrong, with a pair bootstrap of ``draws`` resamples (the probabilities held fixed)."""
    wrong = np.asarray(wrong, dtype=np.float64)
    ones = np.ones_like(wrong)
    point = group_rates(wrong, ones, if_chosen, if_rejected)
    if draws <= 0:
        return summarize(rule, point, None)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(wrong.size, np.full(wrong.size, 1.0 / wrong.size), size=draws)
    return summarize(rule, point, group_rates(wrong, weights, if_chosen, if_rejected))
