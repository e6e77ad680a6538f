"""The results of a rank check: agreement, preservation, the metrics of one subset, the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prefnoise import columns as C


@dataclass
class Agreement:
    """Pairwise rank agreement: correctly ordered pairs (prediction ties count half)."""

    value: float | None
    low: float | None
    high: float | None
    pairs: int  # pairs with a strict true order (the denominator)
    true_ties: int  # pairs excluded because the truth ties
    pred_ties: int  # pairs the prediction ties (counted as half right)


@dataclass
class Preservation:
    """Per-prompt rank preservation: fraction of prompts whose every strict true order is kept."""

    value: float | None
    prompts: int  # prompts with at least one strictly ordered pair (the denominator)
    preserved: int
    unordered_prompts: int  # prompts whose responses all tie in the truth (excluded)


@dataclass
class RankMetrics:
    """Every metric for one subset of the data (the whole table, or one value of a split column)."""

    rows: int
    agreement: Agreement
    preservation: Preservation
    responses: int | None = None
    prompts: int | None = None
    kendall_tau_b: float | None = None
    spearman_rho: float | None = None
    kendall_tau_b_per_prompt: float | None = None  # mean over prompts where it is defined
    spearman_rho_per_prompt: float | None = None
    prompts_with_tau: int | None = None


@dataclass
class RankReport:
    """A rank check: overall metrics, metrics per split value, worst pairs; ``to_dict`` for JSON."""

    layout: str  # "pairs" or "long"
    reference: str  # "score" (a true reward) or "labels"
    pred: str
    true: str | None
    overall: RankMetrics
    splits: dict[str, dict[str, RankMetrics]] = field(default_factory=dict)
    worst: list[dict[str, Any]] = field(default_factory=list)
    dropped_rows: int = 0  # rows skipped: a predicted or reference reward is null, NaN or infinite
    n_boot: int = 0
    seed: int = C.DEFAULT_SEED
    note: str | None = None  # e.g. why the labels are the reference
    interval: str = ""  # how the agreement intervals were resampled

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return asdict(self)
