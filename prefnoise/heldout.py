"""Held out means held out: which pairs a reward model saw, and agreement only on the ones it did not.

``fit-reward`` writes the pair_ids it trained and validated on into the model directory
(``training_pairs.parquet``: ``pair_id``, ``split`` ∈ {train, val}); ``score`` marks every scored row
(``in_training``, ``in_validation``) and reports agreement on unseen rows apart from the rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.data import first_error_line
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics import tie_half_accuracy
from prefnoise.noise import uniform_draws
from prefnoise.options.split import SplitOptions

TRAINING_PAIRS_FILE = "training_pairs.parquet"
IN_TRAINING = "in_training"
IN_VALIDATION = "in_validation"
TRAIN, VAL = "train", "val"


def pair_splits(pair_ids: pl.Series, train_index: np.ndarray, val_index: np.ndarray) -> pl.DataFrame:
    """The (pair_id, split) table of a fit: which pairs trained the model and which validated it."""
    return pl.concat(
        [
            pl.DataFrame({C.PAIR_ID: pair_ids.gather(train_index), "split": TRAIN}),
            pl.DataFrame({C.PAIR_ID: pair_ids.gather(val_index), "split": VAL}),
        ]
    ).with_columns(pl.col(C.PAIR_ID).cast(pl.String), pl.col("split").cast(pl.String))


def write_training_pairs(splits: pl.DataFrame, directory: str | Path) -> None:
    """Store ``splits`` in a model directory."""
    splits.write_parquet(Path(directory) / TRAINING_PAIRS_FILE, compression="zstd")


def read_training_pairs(directory: str | Path) -> pl.DataFrame | None:
    """The (pair_id, split) table saved beside a model, or None for a model saved without one."""
    path = Path(directory) / TRAINING_PAIRS_FILE
    if not path.is_file():
        return None
    try:
        splits = pl.read_parquet(path)
    except Exception as error:  # polars raises several types for a damaged file

        reason = first_error_line(error)
        raise PrefnoiseError(f"{path}: unreadable ({reason}); the model directory is damaged") from None
    if set(splits.columns) != {C.PAIR_ID, "split"}:
        raise PrefnoiseError(f"{path}: expected columns pair_id and split; the model directory is damaged")
    return splits


def mark_seen(frame: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with boolean ``in_training`` and ``in_validation``: was the row's pair_id used by the fit?"""
    train = splits.filter(pl.col("split") == TRAIN)[C.PAIR_ID]
    val = splits.filter(pl.col("split") == VAL)[C.PAIR_ID]
    return frame.with_columns(
        pl.col(C.PAIR_ID).cast(pl.String).is_in(train.implode()).alias(IN_TRAINING),
        pl.col(C.PAIR_ID).cast(pl.String).is_in(val.implode()).alias(IN_VALIDATION),
    )


def unseen_mask(frame: pl.DataFrame) -> np.ndarray:
    """Rows the model neither trained nor validated on (all rows when the table is not marked)."""
    if IN_TRAINING not in frame.columns:
        return np.ones(frame.height, dtype=bool)
    seen = frame[IN_TRAINING].fill_null(False).to_numpy() | frame[IN_VALIDATION].fill_null(False).to_numpy()
    return ~seen


def agreement_summary(scored: pl.DataFrame) -> dict[str, object]:
    """Agreement of the learned margins with the given (and, with ``flipped``, the clean) labels, on all
    rows and on the rows the model never saw, by the one tie rule (a predicted tie counts 1/2)."""

    margin = (scored[C.chosen(C.REWARD)] - scored[C.rejected(C.REWARD)]).to_numpy()
    clean_sign = (
        np.where(scored[C.FLIPPED].fill_null(False).to_numpy(), -1.0, 1.0) if C.FLIPPED in scored.columns else None
    )
    unseen = unseen_mask(scored)
    summary: dict[str, object] = {"accuracy": tie_half_accuracy(margin)}
    if clean_sign is not None:
        summary["clean_accuracy"] = tie_half_accuracy(margin, clean_sign)
    if IN_TRAINING in scored.columns:
        summary["seen"] = {
            "train": int(scored[IN_TRAINING].sum()),
            "val": int(scored[IN_VALIDATION].sum()),
            "unseen": int(unseen.sum()),
        }
        held_out = bool(unseen.any())
        summary["unseen_accuracy"] = tie_half_accuracy(margin[unseen]) if held_out else None
        if clean_sign is not None:
            unseen_clean = tie_half_accuracy(margin[unseen], clean_sign[unseen]) if held_out else None
            summary["unseen_clean_accuracy"] = unseen_clean
    return summary


def split_table(
    frame: pl.DataFrame, *, test_fraction: float, by: str = "prompt", seed: int = C.DEFAULT_SEED
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, test): a deterministic split of a canonical table, prompt-disjoint by default.

    Each prompt (``by="prompt"``) or pair (``by="pair"``) goes to the test side when a keyed hash of
    (seed, its text or pair_id) falls below ``test_fraction``, so the split depends on neither row order
    nor batching, and every pair of one prompt lands on the same side.
    """

    SplitOptions(test_fraction=test_fraction, by=by, seed=seed)  # OptionError for a bad fraction or unit
    mask = pl.Series(held_out_mask(frame, test_fraction=test_fraction, by=by, seed=seed))
    return frame.filter(~mask), frame.filter(mask)


def held_out_mask(frame: pl.DataFrame, *, test_fraction: float, by: str, seed: int) -> np.ndarray:
    """Which rows of ``frame`` go to the test side of :func:`split_table` (row by row, so any block of rows
    gets the same answer as the whole table)."""
    if by == "prompt":  # a fixed-size digest, so long prompts cost no more than short ones
        keys = [hashlib.blake2b(p.encode("utf-8"), digest_size=8).hexdigest() for p in frame[C.PROMPT].to_list()]
    else:
        keys = frame[C.PAIR_ID].cast(pl.String).to_list()
    return uniform_draws(keys, seed, stream=f"split-by-{by}") < test_fraction
