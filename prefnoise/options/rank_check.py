"""``rank-check``'s options: which rewards to compare, the report's detail, and its gates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefnoise import columns as C
from prefnoise.options.ranges import OptionError, Options


@dataclass(frozen=True)
class RankCheckOptions(Options):
    """``prefnoise rank-check``: predicted reward ``pred`` against the true reward ``true`` (or the labels).

    ``long``: the table is long (prompt_id, <pred>, <true>). ``group_by``: columns to split the report by.
    ``bootstrap`` resamples give the 95% intervals (seeded by ``seed``); ``show_worst`` lists the K worst
    pairs. ``min_agreement``/``min_kendall``/``min_preservation`` are gates. ``memory_responses`` bounds
    memory (None: the library's default), spilling to ``temp_dir``. ``model`` scores a pair table first
    (a fit-reward directory, a sequence-classification model or hub id, or what pn.fit_reward returned)
    on ``device`` with ``batch_size``.
    """

    pred: str = C.REWARD
    true: str | None = None
    long: bool = False
    group_by: tuple[str, ...] = ()
    bootstrap: int = 1000
    show_worst: int = 0
    min_agreement: float | None = None
    min_kendall: float | None = None
    min_preservation: float | None = None
    memory_responses: int | None = None
    temp_dir: str | Path | None = None
    seed: int = C.DEFAULT_SEED
    model: Any = None
    device: str = "auto"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        group_by = self.group_by
        object.__setattr__(self, "group_by", (group_by,) if isinstance(group_by, str) else tuple(group_by or ()))
        super().__post_init__()

    def check(self) -> None:
        """``model`` scores a pair table, so it does not go with ``long``."""
        if self.model is not None and self.long:
            raise OptionError("model", "scores a pair table; it does not apply with {long=True}", mentions=("long",))
