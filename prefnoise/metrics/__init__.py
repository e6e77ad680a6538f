"""Rank metrics: does a learned reward order responses like the true reward does?

The paper (Nishimori et al. 2025, Sec. 4.1) calls a reward r *rank-preserving* with respect to the
true reward r* when, for every prompt and every two responses a, a', r*(a) > r*(a') implies
r(a) > r(a'). This package measures how close a reward comes to that, on two input shapes:

* the canonical **pair table** (one row per pair; predicted ``chosen_<pred>``/``rejected_<pred>``,
  reference ``chosen_<true>``/``rejected_<true>``, or the labels themselves when no true reward
  exists: the chosen response is then taken as the better one);
* a **long table** of responses: ``prompt_id``, ``<pred>``, ``<true>`` (k responses per prompt,
  UltraFeedback style); its pairs are all pairs of responses under one prompt.

A report streams the input once in batches and holds at most about ``memory_responses``
responses at a time, whatever the table's size:

1. each batch adds to the pair outcome counts (agreement, its bootstrap) and the worst-pair
   candidates, and its responses go to buckets by a hash of their prompt;
2. each prompt bucket gives the per-prompt statistics (preservation, per-prompt tau and rho,
   a long table's agreement) and sends its responses on to buckets by ranges of the true reward;
3. Kendall's tau-b and Spearman's rho over all responses are then combined from two passes over
   reward-value buckets (:mod:`~prefnoise.metrics.global_ranks`;
   :mod:`~prefnoise.metrics.rankstats` sorts inside a bucket): pairs within a true-reward bucket
   are counted exactly there and each response gets its global true rank; the responses then move
   to buckets by the predicted reward, where pairs within a bucket are counted exactly, pairs
   across buckets by a running count of earlier buckets, and each response gets its global
   predicted rank.

With one bucket (a table that fits) nothing touches the disk and step 3 is one in-memory pass.
Each cut point between reward ranges has a bucket of its own, streamed in chunks (its responses
all tie), so a discrete score held by millions of responses stays within the budget; only a
single prompt with more responses than the budget makes a bucket larger than it.

For a pair table, "all responses" means the pairs reshaped to one row per response, keeping the
first row of each (split, prompt, response text) — a response that appears in several pairs of a
prompt is counted once.

Modules: ``report`` (the public functions), ``builder`` (the streaming report), ``totals`` (per-prompt
sums), ``agreement`` (pair outcomes, bootstrap), ``tables`` (layout and projection), ``figures``,
``results`` (the dataclasses), ``rankstats``, ``global_ranks`` and ``spill`` (buckets on disk).
"""

from __future__ import annotations

from prefnoise.metrics.agreement import CONFIDENCE, pair_outcome, signed_margin, tie_half_accuracy, tie_half_outcomes
from prefnoise.metrics.figures import figure_frames
from prefnoise.metrics.names import LONG_REQUIRED, PROMPT_ID
from prefnoise.metrics.report import (
    DEFAULT_MEMORY_RESPONSES,
    kendall_tau_b,
    pairwise_agreement,
    rank_preservation,
    rank_report,
    spearman_rho,
)
from prefnoise.metrics.results import Agreement, Preservation, RankMetrics, RankReport
from prefnoise.metrics.tables import check_reward_types, detect_layout

__all__ = [
    "CONFIDENCE",
    "DEFAULT_MEMORY_RESPONSES",
    "LONG_REQUIRED",
    "PROMPT_ID",
    "Agreement",
    "Preservation",
    "RankMetrics",
    "RankReport",
    "check_reward_types",
    "detect_layout",
    "figure_frames",
    "kendall_tau_b",
    "pair_outcome",
    "pairwise_agreement",
    "rank_preservation",
    "rank_report",
    "signed_margin",
    "spearman_rho",
    "tie_half_accuracy",
    "tie_half_outcomes",
]
