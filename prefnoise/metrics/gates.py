"""rank-check's gates: each ``--min-*`` threshold against its overall metric, as data CI can read."""

from __future__ import annotations

from typing import Any

from prefnoise.metrics.results import RankMetrics

GATE_OP = ">="  # a gate passes when its metric is at least the threshold


def gate_results(
    metrics: RankMetrics, min_agreement: float | None, min_kendall: float | None, min_preservation: float | None
) -> list[dict[str, Any]]:
    """One ``{metric, op, threshold, value, passed}`` object per gate that was set, in a fixed order; a
    metric that cannot be computed (value None) fails its gate."""
    gates = [
        ("agreement", metrics.agreement.value, min_agreement),
        ("kendall_tau_b", metrics.kendall_tau_b, min_kendall),
        ("preservation", metrics.preservation.value, min_preservation),
    ]
    return [
        {
            "metric": name,
            "op": GATE_OP,
            "threshold": threshold,
            "value": value,
            "passed": value is not None and value >= threshold,
        }
        for name, value, threshold in gates
        if threshold is not None
    ]


def failed_gate_lines(gates: list[dict[str, Any]]) -> list[str]:
    """One line for a person per failed gate, e.g. ``agreement 0.7600 < 0.8``."""
    return [
        f"{gate['metric']} {'n/a' if gate['value'] is None else format(gate['value'], '.4f')} < {gate['threshold']}"
        for gate in gates
        if not gate["passed"]
    ]
