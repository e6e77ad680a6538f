"""Out-of-fold margins kept from a previous audit, so that ``--estimate-only`` and ``--fix`` need not fit the
fold models again.

Every audit that fits fold models keeps its margins in ``<cache dir>/audit-margins/`` (one file per input,
written atomically) with a fingerprint of everything that shapes them: every column of the table as read,
the fold and refit counts, the seed, each fit option, the device, the encoder's or model's files and the
prefnoise version. A later run reuses them only when its own fingerprint is the same and the file's pair_ids
are the table's, in order, with finite margins; anything else recomputes, and says why in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prefnoise import __version__
from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.data import file_fingerprint
from prefnoise.outputs import default_cache_dir

MARGINS_DIR = "audit-margins"


def margins_fingerprint(frame: pl.DataFrame, parameters: dict[str, Any]) -> str:
    """Hex digest of the table (every column, in order) and of ``parameters`` (folds, refits, seed, the fit
    options and device), with the content of any encoder or model directory they name and the version."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"prefnoise {__version__} polars {pl.__version__}\0".encode())
    buffer = io.BytesIO()  # the table's columns, names and types as one Arrow IPC stream (one chunk each)
    frame.rechunk().write_ipc(buffer, compression="uncompressed")
    digest.update(buffer.getbuffer())
    digest.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    for key in ("encoder_path", "model_path"):
        path = parameters.get(key)
        if path is not None and Path(path).is_dir():
            digest.update(file_fingerprint(Path(path)).encode())
    return digest.hexdigest()


def slot_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The file that keeps the margins of input ``name`` (its resolved path when it is a file)."""
    resolved = str(Path(name).resolve()) if Path(name).is_file() else name
    key = hashlib.blake2b(resolved.encode(), digest_size=10).hexdigest()
    return Path(cache_dir or default_cache_dir()) / MARGINS_DIR / f"margins-{key}.npz"


@dataclass
class KeptMargins:
    """Margins read back: the first cross-fit's fold of each pair and the (refits × pairs) margins."""

    fold: np.ndarray
    margins: np.ndarray


def keep_margins(path: Path, fingerprint: str, frame: pl.DataFrame, fold: np.ndarray, margins: np.ndarray) -> None:
    """Write the margins of ``frame``'s pairs with their ``fingerprint`` to ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, fingerprint=np.array(fingerprint), pair_id=np.asarray(frame[C.PAIR_ID].to_list(), dtype=str),
                 fold=np.asarray(fold, dtype=np.int64), margins=np.asarray(margins, dtype=np.float64))


def read_kept_margins(path: Path, fingerprint: str, frame: pl.DataFrame) -> tuple[KeptMargins | None, str]:
    """The margins kept at ``path`` when they are this run's (same fingerprint, the table's pair_ids in order,
    finite), else None; and one line saying which, or why they were not used."""
    if not path.is_file():
        return None, "no margins of a previous audit of this input; fitting the fold models"
    try:
        with np.load(path, allow_pickle=False) as kept:
            stored, pair_ids = str(kept["fingerprint"]), kept["pair_id"]
            fold, margins = kept["fold"], kept["margins"]
    except Exception:  # a damaged file is only a cache: fit again
        return None, f"the kept margins {path} are unreadable; fitting the fold models again"
    if stored != fingerprint:
        return None, ("the previous audit of this input used other data or options (the fingerprint differs); "
                      "fitting the fold models again")
    same_pairs = pair_ids.shape == (frame.height,) and bool((pair_ids == np.asarray(frame[C.PAIR_ID].to_list(),
                                                                                     dtype=str)).all())
    if not same_pairs or margins.ndim != 2 or margins.shape[1] != frame.height or fold.shape != (frame.height,) \
            or not np.isfinite(margins).all():
        return None, f"the kept margins {path} do not match this table's pairs; fitting the fold models again"
    return KeptMargins(fold, margins), ("reused the out-of-fold margins of a previous audit of this input "
                                        "(same data and options)")


__all__ = ["MARGINS_DIR", "KeptMargins", "keep_margins", "margins_fingerprint", "read_kept_margins", "slot_path"]
