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
POLICY_LOSS_NAMES: tuple[str, ...] = ("sympo", "dpo", "cdpo", "rdpo", "ipo", "ropo", "hinge")
