"""Asserting option errors: the Python API names the keyword (``lr=``), the CLI the flag (``--lr``)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from prefnoise.options import OptionError


@contextlib.contextmanager
def option_error(flag_pattern: str, keyword_pattern: str | None = None) -> Iterator[None]:
    """Expect an OptionError whose CLI wording (``as_flag()``) matches ``flag_pattern`` and whose Python
    wording (``str()``) matches ``keyword_pattern`` (default: it names the option as ``name=``)."""
    with pytest.raises(OptionError) as raised:
        yield
    error = raised.value
    assert re.search(flag_pattern, error.as_flag()), error.as_flag()
    assert re.search(keyword_pattern or re.escape(f"{error.option}="), str(error)), str(error)
