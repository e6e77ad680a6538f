"""Loss names, importable without torch so the CLI can list and check them before loading a model.

:mod:`prefnoise.losses` implements each one; a test keeps the two in step.
"""

from __future__ import annotations

MARGIN_LOSS_NAMES: tuple[str, ...] = (
    "sigmoid",
    "ramp",
    "unhinged",
    "logistic",
    "hinge",
    "squared",
    "exponential",
    "cdpo",
    "rdpo",
    "ipo",
    "ropo",
)
SYMMETRIC_LOSS_NAMES: tuple[str, ...] = ("sigmoid", "ramp", "unhinged")
POLICY_LOSS_NAMES: tuple[str, ...] = ("sympo", "dpo", "cdpo", "rdpo", "ipo", "ropo", "hinge", "drdpo")

# Flip rates have no default (PAPER.md: a user must supply or estimate ε, never get a silent one).
MARGIN_RATE_PARAMS: dict[str, str] = {"cdpo": "eps", "rdpo": "eps"}  # fit-reward --eps
POLICY_RATE_OPTIONS: dict[str, str] = {"cdpo": "label_smoothing", "rdpo": "noise_rate"}  # align's options


def missing_rate(loss: str, options: dict[str, object], required: dict[str, str]) -> str | None:
    """The message for loss ``loss`` run without its flip-rate option (``required[loss]``), else None."""
    name = required.get(loss)
    if name is None or options.get(name) is not None:
        return None
    flag = "--" + name.replace("_", "-")
    what = "label-smoothing rate" if loss == "cdpo" else "label flip rate"
    return (f"--loss {loss} needs {flag} ε, the {what} in [0, 0.5) (there is no default; "
            "estimate it with `prefnoise audit --estimate-only`)")
