"""The one table of option ranges and the checks every options object runs once, at construction.

An :class:`OptionError` names the option as a Python keyword (``rate=``) by default; the CLI shows the
same error with the option's flag (``--rate``) through :meth:`OptionError.as_flag`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from prefnoise.errors import PrefnoiseError

SEED_MAX = 2**32 - 1

# One rule per option name, for every command that has the option: (low, low inclusive, high, high inclusive).
# None bounds are open. Every float option must also be finite.
OPTION_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "seed": (0, True, SEED_MAX, True),
    "rate": (0, True, 1, True),
    "rate_pos": (0, True, 1, True),
    "rate_neg": (0, True, 1, True),
    "max_rate": (0, True, 1, True),
    "temperature": (0, False, None, False),
    "beta": (0, False, None, False),
    "clip": (0, True, None, False),
    "label_smoothing": (0, True, 0.5, False),
    "noise_rate": (0, True, 0.5, False),
    "eps": (0, True, 0.5, False),
    "tau": (0, False, None, False),
    "alpha": (0, False, None, False),
    "beta_prime": (0, False, None, False),
    "lr": (0, False, None, False),
    "weight_decay": (0, True, None, False),
    "margin_scale": (0, False, None, False),
    "warmup_steps": (0, True, None, False),
    "max_grad_norm": (0, True, None, False),
    "batch_size": (1, True, None, False),
    "grad_accum": (1, True, None, False),
    "max_tokens_per_batch": (1, True, None, False),
    "epochs": (1, True, None, False),
    "max_steps": (1, True, None, False),
    "max_length": (1, True, None, False),
    "max_prompt_length": (1, True, None, False),
    "lora_r": (0, True, None, False),
    "lora_alpha": (0, False, None, False),
    "lora_dropout": (0, True, 1, False),
    "dropout": (0, True, 1, False),
    "val_fraction": (0, True, 1, False),
    "eval_every": (0, True, None, False),
    "save_every": (0, True, None, False),
    "log_every": (1, True, None, False),
    "folds": (2, True, None, False),
    "refits": (1, True, None, False),
    "hidden": (1, True, None, False),
    "layers": (0, True, None, False),
    "output_clip": (0, True, None, False),
    "bootstrap": (0, True, None, False),
    "show_suspects": (0, True, None, False),
    "show_worst": (0, True, None, False),
    "threshold": (0, True, 1, True),
    "test_fraction": (0, False, 1, False),
    "min_agreement": (0, True, 1, True),
    "min_kendall": (-1, True, 1, True),
    "min_preservation": (0, True, 1, True),
    "memory_responses": (1, True, None, False),
    "early_stopping": (1, True, None, False),
    "seeds": (1, True, None, False),
    "train_pairs": (10, True, None, False),
    "test_pairs": (10, True, None, False),
    "warmup": (0, True, 1, False),  # fit-reward: a share of the steps
    "pairs": (40, True, None, False),
}


def flag_of(option: str) -> str:
    """The CLI flag spelling of an option name: ``max_length`` -> ``--max-length``."""
    return "--" + option.replace("_", "-")


class OptionError(PrefnoiseError):
    """A bad option value. ``str()`` names the Python keyword (``rate=``); :meth:`as_flag` the CLI flag.

    ``problem`` may name options as ``{name}`` (rendered ``name=`` or ``--name``; ``{force=True}``
    renders ``force=True`` or ``--force``) for those in ``option`` and ``mentions``. When it names
    ``option`` itself it is the whole sentence; otherwise the option leads (``rate= must be ...``).
    """

    def __init__(self, option: str, problem: str, *, mentions: tuple[str, ...] = ()) -> None:
        self.option = option
        self.problem = problem
        self.mentions = (option, *mentions)
        super().__init__(self._render(keyword=True))

    def _render(self, *, keyword: bool) -> str:
        def name(match: re.Match[str]) -> str:
            option, value = match.group(1), match.group(2)
            if option not in self.mentions:
                return match.group(0)
            if not keyword:
                return flag_of(option)
            return f"{option}{value or ''}"

        text = _PLACEHOLDER.sub(name, self.problem)
        if "{" + self.option + "}" in self.problem:
            return text
        return f"{self.option}= {text}" if keyword else f"{flag_of(self.option)} {text}"

    def as_flag(self) -> str:
        """The same message naming the option as the CLI spells it (``--rate must be ...``)."""
        return self._render(keyword=False)


_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)(=[A-Za-z0-9_.]+)?\}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe_range(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    """A range rule in words: ``>= 1``, ``in [0, 0.5)``."""
    if high is None:
        return f">= {_number(low)}" if low_in else f"> {_number(low)}"
    return f"in {'[' if low_in else '('}{_number(low)}, {_number(high)}{']' if high_in else ')'}"


def check_option(name: str, value: Any) -> None:
    """OptionError when a numeric ``value`` is not finite or is outside ``name``'s rule in OPTION_RANGES."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(name, f"must be a finite number, got {value}")
    rule = OPTION_RANGES.get(name)
    if rule is None:
        return
    low, low_in, high, high_in = rule
    below = low is not None and (value < low if low_in else value <= low)
    above = high is not None and (value > high if high_in else value >= high)
    if below or above:
        raise OptionError(name, f"must be {describe_range(*rule)}, got {_number(value)}")


def check_options(values: dict[str, Any]) -> None:
    """Run :func:`check_option` on every entry of ``values`` (the first bad one raises)."""
    for name, value in values.items():
        check_option(name, value)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every command's frozen options object: ranges checked once, at construction.

    Subclasses add their fields and put cross-field rules in :meth:`check` (raise OptionError naming
    the field). Library code trusts a built options object and never re-checks it.
    """

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_option(field.name, getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Cross-field rules; the base has none."""

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)
