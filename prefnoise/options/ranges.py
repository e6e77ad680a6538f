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
# None bounds are open. Every float option must also be finite. Upper bounds stop values that are
# absurd (a typo, a unit slip, a hostile config): each bound's comment says why it is where it is.
OPTION_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "seed": (0, True, SEED_MAX, True),
    "rate": (0, True, 1, True),
    "rate_pos": (0, True, 1, True),
    "rate_neg": (0, True, 1, True),
    "max_rate": (0, True, 1, True),
    "temperature": (0, False, 1e6, True),  # bt noise: beyond 1e6 every flip probability is 1/2
    "beta": (0, False, 1e6, True),  # a KL weight; larger only overflows exp() in the loss
    "clip": (0, True, 1e6, True),  # a margin clip; larger is no clip (0 turns it off)
    "label_smoothing": (0, True, 0.5, False),
    "noise_rate": (0, True, 0.5, False),
    "eps": (0, True, 0.5, False),
    "tau": (0, False, 1e6, True),  # a loss scale; larger overflows float32
    "alpha": (0, False, 1e6, True),  # a loss scale; larger overflows float32
    "beta_prime": (0, False, 1e6, True),  # a loss scale; larger overflows float32
    "lr": (0, False, 1e30, True),  # float32 ends at 3.4e38: 1e300 overflowed before training (1e30 diverges, reported)
    "weight_decay": (0, True, 1e3, True),  # AdamW decays by lr*wd per step; 1e3 is far past useful
    "margin_scale": (0, False, 1e6, True),  # multiplies margins; larger overflows float32
    "warmup_steps": (0, True, 10**9, True),  # as max_steps
    "max_grad_norm": (0, True, 1e6, True),  # a clip norm; larger is no clip
    "batch_size": (1, True, 2**20, True),  # a million pairs per batch; more cannot fit in memory
    "grad_accum": (1, True, 2**16, True),  # 65,536 micro-batches per step; more never steps
    "max_tokens_per_batch": (1, True, 2**30, True),  # a billion tokens per batch
    "epochs": (1, True, 10**6, True),  # a million passes over the data; more runs until killed
    "max_steps": (1, True, 10**9, True),  # a billion optimiser steps
    "max_length": (1, True, 2**20, True),  # a million tokens, above any model's context
    "max_prompt_length": (1, True, 2**20, True),  # as max_length
    "lora_r": (0, True, 2**16, True),  # a LoRA rank above any model width
    "lora_alpha": (0, False, 1e6, True),  # scales the adapter; larger overflows
    "lora_dropout": (0, True, 1, False),
    "dropout": (0, True, 1, False),
    "val_fraction": (0, True, 1, False),
    "eval_every": (0, True, 10**9, True),  # as max_steps
    "save_every": (0, True, 10**9, True),  # as max_steps
    "log_every": (1, True, 10**9, True),  # as max_steps
    "folds": (2, True, 1000, True),  # each fold trains a model; 1,000 is already days
    "refits": (1, True, 1000, True),  # each refit trains a model
    "hidden": (1, True, 2**16, True),  # MLP width; 65,536 is 4e9 weights per layer (memory is also estimated)
    "layers": (0, True, 1024, True),  # MLP depth; deeper does not train (memory is also estimated)
    "output_clip": (0, True, 1e6, True),  # a reward bound; larger is no bound
    "bootstrap": (0, True, 10**6, True),  # resamples; a million gives intervals to 3 digits
    "show_suspects": (0, True, 10**7, True),  # rows printed
    "show_worst": (0, True, 10**7, True),  # rows printed
    "threshold": (0, True, 1, True),
    "test_fraction": (0, False, 1, False),
    "min_agreement": (0, True, 1, True),
    "min_kendall": (-1, True, 1, True),
    "min_preservation": (0, True, 1, True),
    "memory_responses": (1, True, 10**9, True),  # responses held at once
    "early_stopping": (1, True, 10**6, True),  # patience in epochs, as epochs
    "seeds": (1, True, 1000, True),  # each seed reruns the whole experiment
    "train_pairs": (10, True, 10**8, True),  # generated pairs held in memory
    "test_pairs": (10, True, 10**8, True),  # generated pairs held in memory
    "warmup": (0, True, 1, False),  # fit-reward: a share of the steps
    "pairs": (40, True, 10**8, True),  # generated pairs held in memory
    "workers": (1, True, 4096, True),  # --engine ray: CPU slots of a local cluster; more is no machine
}


# Options whose upper bound above is a cap on absurd values, not part of their meaning: an error names
# only the side that was crossed ("--epochs must be >= 1", "--epochs must be <= 1000000").
CAPPED = frozenset({
    "temperature",
    "beta",
    "clip",
    "tau",
    "alpha",
    "beta_prime",
    "lr",
    "weight_decay",
    "margin_scale",
    "warmup_steps",
    "max_grad_norm",
    "batch_size",
    "grad_accum",
    "max_tokens_per_batch",
    "epochs",
    "max_steps",
    "max_length",
    "max_prompt_length",
    "lora_r",
    "lora_alpha",
    "eval_every",
    "save_every",
    "log_every",
    "folds",
    "refits",
    "hidden",
    "layers",
    "output_clip",
    "bootstrap",
    "show_suspects",
    "show_worst",
    "memory_responses",
    "early_stopping",
    "seeds",
    "train_pairs",
    "test_pairs",
    "pairs",
    "workers",
})


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
    if isinstance(value, int) and abs(value) >= 10**15:
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[0]}.{digits[1:4]}e+{len(digits) - 1}"  # 10**400 is no float
    if abs(value) >= 1e15:
        return f"{float(value):g}"
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
    if (below or above) and name in CAPPED:
        side = describe_range(low, low_in, None, False) if below else f"{'<=' if high_in else '<'} {_number(high)}"
        raise OptionError(name, f"must be {side}, got {_number(value)}")
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
