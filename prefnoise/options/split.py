"""``split``'s options: the held-out share, the split unit and the seed."""

from __future__ import annotations

from dataclasses import dataclass

from prefnoise import columns as C
from prefnoise.options.ranges import OptionError, Options

SPLIT_BY = ("prompt", "pair")


@dataclass(frozen=True)
class SplitOptions(Options):
    """``prefnoise split``: hold out ``test_fraction`` of the prompts (``by="prompt"``: no prompt on both
    sides) or of the pairs (``by="pair"``), chosen by a keyed hash of ``seed``."""

    test_fraction: float = 0.2
    by: str = "prompt"
    seed: int = C.DEFAULT_SEED

    def check(self) -> None:
        """``by`` names a split unit (``test_fraction``'s range is OPTION_RANGES's (0, 1))."""
        if self.by not in SPLIT_BY:
            raise OptionError("by", f"must be one of: {', '.join(SPLIT_BY)}; got {self.by!r}")
