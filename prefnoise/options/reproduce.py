"""``reproduce``'s options: the grid overrides of the paper's two experiments (None keeps the preset)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefnoise.options.ranges import OptionError, Options


def names_of(option: str, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A comma-separated option (or a sequence of names) as a tuple of names; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str) and not isinstance(value, Sequence):
        raise OptionError(option, f"takes names, comma-separated, got {value!r}")
    names = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(name).strip() for name in names if str(name).strip())


def rates_of(value: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``rates`` as a tuple of floats ("0,0.4" or a sequence); None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(float(part) for part in parts if str(part).strip())
    except (TypeError, ValueError):
        raise OptionError("rates", f"takes comma-separated numbers, got {value!r}") from None


@dataclass(frozen=True)
class ReproduceSyntheticOptions(Options):
    """``prefnoise reproduce synthetic``: symmetric vs convex losses under label noise on digit images.

    ``quick``: the reduced grid (about a minute on 2 CPU cores). ``source``: digits (sklearn 8×8, an MLP)
    or mnist (28×28, the paper's CNN; ``mnist`` a local file instead of the bundled images). ``noise``,
    ``rates``, ``losses``: the grid (names or comma-separated); the other counts override the preset.
    Names and rates are checked against the experiment's grid when it is built.
    """

    quick: bool = False
    seeds: int | None = None
    epochs: int | None = None
    train_pairs: int | None = None
    test_pairs: int | None = None
    batch_size: int | None = None
    source: str = "digits"
    noise: tuple[str, ...] | None = None
    rates: tuple[float, ...] | None = None
    losses: tuple[str, ...] | None = None
    mnist: str | Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise", names_of("noise", self.noise))
        object.__setattr__(self, "losses", names_of("losses", self.losses))
        object.__setattr__(self, "rates", rates_of(self.rates))
        super().__post_init__()


@dataclass(frozen=True)
class ReproduceAlignmentOptions(Options):
    """``prefnoise reproduce alignment``: SymPO against DPO, cDPO, rDPO and IPO under label noise on a tiny
    LM. ``quick``: clean and 40% noise, DPO vs SymPO, one seed; ``asymmetric``: add the 30%/10%
    class-conditional noise column."""

    quick: bool = False
    seeds: int | None = None
    epochs: int | None = None
    pairs: int | None = None
    asymmetric: bool = True
    device: str = "cpu"


REPRODUCE_OPTIONS: dict[str, type[Options]] = {
    "synthetic": ReproduceSyntheticOptions,
    "alignment": ReproduceAlignmentOptions,
}
