"""``corrupt``'s options and the one rule for noise-model parameters (NoiseSpec checks with it too)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prefnoise import columns as C
from prefnoise.options.ranges import OptionError, Options

NOISE_MODELS = ("symmetric", "asymmetric", "bt", "uniform")
ORIENTATION_RULES = ("longer", "column:NAME", "compare:NAME")


def parse_orientation_rule(rule: str) -> tuple[str, str | None]:
    """(kind, column) of an asymmetric noise ``by`` rule: ``longer``, ``column:NAME`` or ``compare:NAME``."""
    if rule == "longer":
        return "longer", None
    kind, _, name = rule.partition(":")
    if kind in ("column", "compare") and name:
        return kind, name
    raise OptionError("by", f"unknown {{by}} rule {rule!r}; use one of: {', '.join(ORIENTATION_RULES)}")


def _check_rate(option: str, value: float | None) -> None:
    if value is None:
        raise OptionError(option, "is required for this noise model")
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise OptionError(option, f"must be within [0, 1], got {value}")


def check_noise_parameters(
    kind: str,
    *,
    rate: float | None,
    rate_pos: float | None,
    rate_neg: float | None,
    by: str,
    temperature: float,
    max_rate: float,
    exact: bool,
    force: bool,
) -> None:
    """OptionError for noise parameters that cannot run, or that leave the labels without signal unless ``force``."""
    if kind not in NOISE_MODELS:
        raise OptionError("noise", f"unknown noise model {kind!r}; choose one of: {', '.join(NOISE_MODELS)}")
    if kind == "symmetric":
        _check_rate("rate", rate)
        if rate >= 0.5 and not force:  # type: ignore[operator]
            raise OptionError(
                "rate",
                f"{rate} flips at least half the labels, so they carry no signal (or the reverse one); "
                "pass {force=True} if that is what you want",
                mentions=("force",),
            )
    elif kind == "asymmetric":
        _check_rate("rate_pos", rate_pos)
        _check_rate("rate_neg", rate_neg)
        if rate_pos + rate_neg >= 1 and not force:  # type: ignore[operator]
            raise OptionError(
                "rate_pos",
                f"+ {{rate_neg}} = {rate_pos + rate_neg:g} >= 1: labels no longer carry the true "  # type: ignore[operator]
                "preference; pass {force=True} if that is what you want",
                mentions=("rate_neg", "force"),
            )
        parse_orientation_rule(by)
    elif kind == "bt":
        if not temperature > 0:
            raise OptionError("temperature", f"must be > 0, got {temperature}")
    elif kind == "uniform":
        _check_rate("max_rate", max_rate)
    if exact and kind not in ("symmetric", "asymmetric"):
        raise OptionError("exact", "{exact} applies to symmetric and asymmetric noise only")


@dataclass(frozen=True)
class CorruptOptions(Options):
    """``prefnoise corrupt``: which noise model flips which labels, and its seed.

    ``noise``: symmetric (``rate``), asymmetric (``rate_pos``/``rate_neg`` by the ``by`` rule), bt
    (``temperature``: flip probability σ(−(s_c − s_r)/T)) or uniform (``max_rate``). ``exact`` flips
    exactly round(rate·n) pairs per group; ``force`` allows rates that leave the labels without signal.
    """

    noise: str = "symmetric"
    rate: float | None = None
    rate_pos: float | None = None
    rate_neg: float | None = None
    by: str = "longer"
    temperature: float = 1.0
    max_rate: float = 0.3
    exact: bool = False
    force: bool = False
    seed: int = C.DEFAULT_SEED

    def check(self) -> None:
        """The noise model's parameter rule (:func:`check_noise_parameters`)."""
        check_noise_parameters(
            self.noise, rate=self.rate, rate_pos=self.rate_pos, rate_neg=self.rate_neg, by=self.by,
            temperature=self.temperature, max_rate=self.max_rate, exact=self.exact, force=self.force,
        )
