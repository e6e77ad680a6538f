"""``reproduce DATA``'s options: the loss × noise-rate × seed grid on the user's own pairs."""

from __future__ import annotations

from dataclasses import dataclass

from prefnoise import columns as C
from prefnoise.loss_names import MARGIN_LOSS_NAMES, MARGIN_RATE_PARAMS
from prefnoise.options.ranges import OptionError, Options
from prefnoise.options.reproduce import names_of, rates_of
from prefnoise.options.split import SPLIT_BY

COMPARISON_NOISE = ("symmetric", "asymmetric", "uniform")


@dataclass(frozen=True)
class ComparisonOptions(Options):
    """The grid of ``prefnoise reproduce DATA``: losses × rates × seeds, and how the data is split and noised.

    ``noise``: symmetric (each rate flips every pair with that probability), asymmetric (a rate flips the
    pairs that ``by`` marks positive, ``rate_neg`` the others) or uniform (a rate is the per-pair maximum).
    """

    losses: tuple[str, ...] = ("sigmoid", "ramp", "logistic")
    rates: tuple[float, ...] = (0.0, 0.2, 0.4)
    reference: str = "logistic"
    seeds: int = 3
    noise: str = "symmetric"
    by: str = "longer"
    rate_neg: float = 0.0
    test_fraction: float = 0.2
    split_by: str = "prompt"
    bootstrap: int = 2000
    seed: int = C.DEFAULT_SEED

    def __post_init__(self) -> None:
        object.__setattr__(self, "losses", names_of("losses", self.losses))
        object.__setattr__(self, "rates", rates_of(self.rates))
        super().__post_init__()

    def check(self) -> None:
        """Losses from the loss table (none that needs a flip rate), rates in [0, 0.5), a known noise rule."""
        for loss in (*self.losses, self.reference):
            if loss not in MARGIN_LOSS_NAMES:
                raise OptionError("losses", f"has {loss!r}, not in the loss table; choose from: "
                                  f"{', '.join(name for name in MARGIN_LOSS_NAMES if name not in MARGIN_RATE_PARAMS)}")
            if loss in MARGIN_RATE_PARAMS:
                raise OptionError("losses", f"has {loss!r}, which needs its flip rate for every cell; compare "
                                  "losses that need none (run fit-reward with --eps for that one)")
        if not self.losses or len(set(self.losses)) != len(self.losses):
            raise OptionError("losses", f"must name distinct losses, got {','.join(self.losses) or 'none'}")
        if not self.rates or any(not (0.0 <= r < 0.5) for r in self.rates) or len(set(self.rates)) != len(self.rates):
            shown = ",".join(f"{r:g}" for r in self.rates) or "none"
            raise OptionError("rates", f"must be distinct noise rates in [0, 0.5), got {shown}")
        if self.noise not in COMPARISON_NOISE:
            raise OptionError("noise", f"must be one of {', '.join(COMPARISON_NOISE)}, got {self.noise!r}")
        if not 0.0 <= self.rate_neg < 0.5:
            raise OptionError("rate_neg", f"must be in [0, 0.5), got {self.rate_neg:g}")
        if self.split_by not in SPLIT_BY:
            raise OptionError("split_by", f"must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")

    @property
    def all_losses(self) -> tuple[str, ...]:
        """The compared losses, the reference included (last when it was not named)."""
        return self.losses if self.reference in self.losses else (*self.losses, self.reference)
