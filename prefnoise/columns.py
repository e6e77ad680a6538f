"""Canonical column names of the preference table: the one place they are spelled.

A row is one preference pair. ``chosen_<name>`` / ``rejected_<name>`` columns (and
``<name>_chosen`` / ``<name>_rejected``, as TRL's ``score_chosen``) describe one response each and
travel with it when a label is flipped; every other column describes the pair.
Inside struct columns (at any depth) the fields ``chosen_<name>``/``rejected_<name>`` and
``<name>_chosen``/``<name>_rejected`` are per-response too and swap with their response (e.g.
UltraFeedback's ``metadata.score_chosen``/``score_rejected``, ``chosen_model``/``rejected_model``).
"""

from __future__ import annotations

from typing import Any

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


def response_column_pairs(column_names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(chosen column, rejected column) of every top-level per-response pair, swapped together on a
    flip: ``chosen_<f>``/``rejected_<f>`` and ``<f>_chosen``/``<f>_rejected`` (TRL's
    ``score_chosen``/``score_rejected``)."""
    names = list(column_names)
    pairs = [(chosen(field), rejected(field)) for field in response_fields(names)]
    for name in names:
        partner = name[: -len(CHOSEN)] + REJECTED if name.endswith("_" + CHOSEN) else None
        if partner is not None and len(name) > len(CHOSEN) + 1 and partner in names and (name, partner) not in pairs:
            pairs.append((name, partner))
    return pairs


def struct_partner(name: str, names: list[str] | tuple[str, ...]) -> str | None:
    """The other response's field for struct field ``name`` (chosen_X <-> rejected_X,
    X_chosen <-> X_rejected) when ``names`` holds it, else None (a field of the pair)."""
    candidates = []
    for this, other in ((CHOSEN, REJECTED), (REJECTED, CHOSEN)):
        if name.startswith(this + "_") and len(name) > len(this) + 1:
            candidates.append(other + name[len(this) :])
        if name.endswith("_" + this) and len(name) > len(this) + 1:
            candidates.append(name[: -len(this)] + other)
    return next((c for c in candidates if c in names and c != name), None)


SHOWN_NAMES = 20  # column names an error message lists before "and N more"


def name_list(names: Any, limit: int = SHOWN_NAMES) -> str:
    """``names`` joined by commas for an error line, the first ``limit`` then "... and N more"."""
    names = [str(name) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... and {len(names) - limit} more"
