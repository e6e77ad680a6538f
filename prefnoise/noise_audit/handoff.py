"""The audit's estimate handed to alignment: ``align --loss rdpo|cdpo --noise-rate-from AUDIT.json``.

AUDIT.json is what ``prefnoise audit DATA --json`` printed. Its ``noise_rate`` object carries the estimate
and its interval; an undetermined estimate (``rate`` null) is refused with the audit's own reason, never
replaced by a guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError

MAX_AUDIT_BYTES = 1 << 20  # an audit --json object is a few KB; a larger file is not one


@dataclass(frozen=True)
class AuditEstimate:
    """The flip rate an audit estimated, its 95% interval, the evidence behind it and the file it came from."""

    rate: float
    low: float | None
    high: float | None
    method: str | None
    path: str

    def provenance(self) -> dict[str, Any]:
        """What a run records about the rate it was given."""
        return asdict(self)


def _noise_rate_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PrefnoiseError(f"{path}: no such audit file; save one with `prefnoise audit DATA --json > {path}`")
    if path.stat().st_size > MAX_AUDIT_BYTES:
        raise PrefnoiseError(f"{path}: over {MAX_AUDIT_BYTES:,} bytes, so not an audit --json object")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PrefnoiseError(f"{path}: not a JSON object ({type(error).__name__}); pass the file "
                             "`prefnoise audit DATA --json` wrote") from None
    estimate = document.get("noise_rate") if isinstance(document, dict) else None
    if not isinstance(estimate, dict) or "rate" not in estimate:
        raise PrefnoiseError(f"{path}: no noise_rate object with a rate; pass the file `prefnoise audit DATA "
                             "--json` wrote")
    return estimate


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(value)
    return float(value)


def read_audit_estimate(path: str | Path) -> AuditEstimate:
    """The estimate in an audit's ``--json`` file; PrefnoiseError (one line) when the file is not one, the
    rate is undetermined (with the audit's reason) or lies outside [0, 0.5)."""
    path = Path(path)
    estimate = _noise_rate_object(path)
    if estimate["rate"] is None:
        reason = estimate.get("reason") or "no reason given"
        raise PrefnoiseError(f"{path}: the audit left the flip rate undetermined ({reason}); a loss that needs "
                             "the rate cannot use it — give the rate yourself, or audit again with "
                             "--annotators or --gold")
    try:
        rate, low, high = (_number(estimate.get(key)) for key in ("rate", "low", "high"))
    except ValueError as error:
        raise PrefnoiseError(f"{path}: noise_rate holds {error.args[0]!r}, not a number") from None
    if not 0.0 <= rate < 0.5:
        raise PrefnoiseError(f"{path}: the audit's rate {rate:g} is outside [0, 0.5), where a flip-rate "
                             "correction is defined")
    method = estimate.get("method")
    return AuditEstimate(rate, low, high, method if isinstance(method, str) else None, str(path))
