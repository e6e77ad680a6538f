"""Canonical column names of the preference table: the one place they are spelled.

A row is one preference pair. ``chosen_<name>`` / ``rejected_<name>`` columns describe one
response each and travel with it when a label is flipped; every other column describes the pair.
"""

from __future__ import annotations

PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
PAIR_ID = "pair_id"
FLIPPED = "flipped"
REQUIRED = (PROMPT, CHOSEN, REJECTED)

CHOSEN_PREFIX = "chosen_"
REJECTED_PREFIX = "rejected_"

# Well-known per-response field names (used as chosen_<field> / rejected_<field>).
SCORE = "score"  # a known true reward
FEATURES = "features"  # fixed-size float vectors (the paper's synthetic actions)
REWARD = "reward"  # a learned reward written by `prefnoise score`
MESSAGES = "messages"  # conversational responses, JSON-encoded role/content lists
PROMPT_MESSAGES = "prompt_messages"  # conversational prompt, JSON-encoded

DEFAULT_SEED = 0


def chosen(field: str) -> str:
    """Column name of the chosen response's ``field``."""
    return CHOSEN_PREFIX + field


def rejected(field: str) -> str:
    """Column name of the rejected response's ``field``."""
    return REJECTED_PREFIX + field


def response_fields(column_names: list[str] | tuple[str, ...]) -> list[str]:
    """Fields present as both ``chosen_<f>`` and ``rejected_<f>`` (swapped together on a flip)."""
    names = set(column_names)
    return [
        name[len(CHOSEN_PREFIX) :]
        for name in column_names
        if name.startswith(CHOSEN_PREFIX) and rejected(name[len(CHOSEN_PREFIX) :]) in names
    ]
