"""The paper's experiments, rebuilt only from prefnoise's own library functions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def with_overrides(config: ConfigT, **overrides: Any) -> ConfigT:
    """A copy of the dataclass ``config`` with the overrides that are not None applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]
