"""JSON that every reader accepts: non-finite floats become null (``--json`` objects, summary files)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, so it is valid JSON."""
    if isinstance(value, dict):
        return {str(k): strict_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json_value(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return value
