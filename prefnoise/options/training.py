"""Choices and rules the options of the two training commands (fit-reward, align) share.

Importable without torch: the CLI checks options before any model library loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from prefnoise import columns as C
from prefnoise.options.ranges import OptionError, flag_of

# The input options every table-reading command takes, with their defaults (the rest: prefnoise.api.tables).
INPUT_DEFAULTS = {"prompt_col": C.PROMPT, "chosen_col": C.CHOSEN, "rejected_col": C.REJECTED, "layout": "auto",
                  "drop_invalid": False}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class RuleError(OptionError):
    """A broken rule between options, worded for Python (keywords) and for the CLI (flags).

    ``str()`` is ``message`` (naming keywords such as ``loss='cdpo'``); :meth:`as_flag` is ``cli_message``
    (naming flags such as ``--loss cdpo``), which the CLI prints.
    """

    def __init__(self, option: str, message: str, cli_message: str) -> None:
        super().__init__(option, message)
        self.args = (message,)
        self.message = message
        self.cli_message = cli_message

    def __str__(self) -> str:
        return self.message

    def as_flag(self) -> str:
        """The message as the CLI words it (flags)."""
        return self.cli_message


def one_of(name: str, value: Any, choices: tuple[str, ...], *, joined: str = ", ", verb: str = "not") -> None:
    """RuleError unless ``value`` is one of ``choices`` (``--name must be one of a, b, not 'x'``)."""
    if value not in choices:
        listed = joined.join(choices)
        raise RuleError(name, f"{name}= must be one of {listed}, {verb} {value!r}",
                        f"{flag_of(name)} must be one of {listed}, {verb} {value!r}")


def check_integers(options: Any, names: tuple[str, ...]) -> None:
    """OptionError when a field of ``names`` holds something other than an integer (or None)."""
    for name in names:
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            if hasattr(value, "__index__") and not isinstance(value, bool):  # numpy integers
                continue
            raise OptionError(name, f"must be an integer, got {value!r}")


def check_training_choices(options: Any) -> None:
    """The choices every training command shares: schedule, precision, report_to, device."""
    if options.schedule is not None:
        one_of("schedule", options.schedule, SCHEDULES)
    one_of("precision", options.precision, PRECISIONS)
    one_of("report_to", options.report_to, REPORT_TO)


def fields_of(options: Any) -> dict[str, Any]:
    """The options object's fields as a plain dict (for trackers, checkpoints and summaries)."""
    return dataclasses.asdict(options)


def keyword_signature(function: Any, options: type, *, before: tuple[str, ...] = (),
                      inputs: dict[str, Any] | None = None) -> inspect.Signature:
    """``function``'s signature with the fields of the options class ``options`` (and the input options
    ``inputs``, name: default) as keyword parameters, defaults included, before its ``**keywords``, so that
    ``help()`` lists every option."""
    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params} | set(before)
    fields = {item.name: (item.default, item.type) for item in dataclasses.fields(options)}
    for name, default in (inputs or {}).items():
        fields.setdefault(name, (default, type(default).__name__))
    for name, (default, annotation) in fields.items():
        if name not in taken:
            default = default if default is not dataclasses.MISSING else inspect.Parameter.empty
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    params += [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    return signature.replace(parameters=params)
