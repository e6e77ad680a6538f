"""Out-of-fold margins: cross-fitted fold models, or precomputed out-of-sample predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import IN_TRAINING, IN_VALIDATION, unseen_mask
from prefnoise.noise_audit.names import FOLD, MARGIN
from prefnoise.options.fit_reward import fit_reward_config


def out_of_fold_margins(
    frame: pl.DataFrame,
    *,
    folds: int = 5,
    seed: int = C.DEFAULT_SEED,
    fit_options: dict[str, Any] | None = None,
    device: str = "auto",
    on_fold: Callable[[int], None] | None = None,
    stacked: bool = True,
) -> pl.DataFrame:
    """``frame`` with ``fold`` and ``oof_margin``: each pair scored by a model fitted on the other folds
    (MLP fold models trained as one stack when ``stacked`` and the options allow it)."""
    # pulls torch: loaded only when a reward model runs
    from prefnoise.reward import fit_reward_model, fold_of_pair_id, score_table

    _check_folds(frame, folds)
    together = stacked_cross_fits(frame, folds=folds, seeds=[seed], fit_options=fit_options, device=device,
                                  on_fold=on_fold) if stacked else None
    if together is not None:
        return frame.with_columns(pl.Series(FOLD, together[0][0], dtype=pl.Int32),
                                  pl.Series(MARGIN, together[1][0], dtype=pl.Float64))
    options = {"loss": "sigmoid", **(fit_options or {})}
    fold = np.asarray(fold_of_pair_id(frame[C.PAIR_ID], folds, seed))
    margins = np.full(frame.height, np.nan)
    for k in range(folds):
        held_out = fold == k
        fit = fit_reward_model(frame.filter(pl.Series(~held_out)), seed=seed + k, device=device, **options)
        scored = score_table(fit.model, frame.filter(pl.Series(held_out)), device=device)
        margins[held_out] = (scored[C.chosen(C.REWARD)] - scored[C.rejected(C.REWARD)]).to_numpy()
        if on_fold is not None:
            on_fold(1)
    return frame.with_columns(pl.Series(FOLD, fold, dtype=pl.Int32), pl.Series(MARGIN, margins, dtype=pl.Float64))


def refit_seed(seed: int, refit: int) -> int:
    """The seed of cross-fit number ``refit`` (fold assignment and fold models): refit 0 uses ``seed``."""
    return seed + 1000 * refit


def cross_fitted_margins(
    frame: pl.DataFrame,
    *,
    folds: int = 5,
    refits: int = 3,
    seed: int = C.DEFAULT_SEED,
    fit_options: dict[str, Any] | None = None,
    device: str = "auto",
    on_fold: Callable[[int], None] | None = None,
    stacked: bool = True,
) -> tuple[pl.DataFrame, np.ndarray]:
    """``refits`` independent cross-fits: ``frame`` with the first one's ``fold`` and the mean ``oof_margin``
    over refits, and the (refits × pairs) matrix of out-of-fold margins, one row per refit.

    MLP fold models (``mlp``, ``embed+mlp``) train together as one stack on features prepared once
    (:mod:`prefnoise.reward.folds`) when the options allow it and ``stacked``; otherwise one fit per fold."""
    if refits < 1:
        raise PrefnoiseError(f"--refits must be at least 1, got {refits}")
    seeds = [refit_seed(seed, r) for r in range(refits)]
    together = stacked_cross_fits(frame, folds=folds, seeds=seeds, fit_options=fit_options, device=device,
                                  on_fold=on_fold) if stacked else None
    if together is not None:
        fold, margins = together
        return frame.with_columns(pl.Series(FOLD, fold[0], dtype=pl.Int32),
                                  pl.Series(MARGIN, margins.mean(axis=0), dtype=pl.Float64)), margins
    runs = [
        out_of_fold_margins(
            frame, folds=folds, seed=s, fit_options=fit_options, device=device, on_fold=on_fold, stacked=False
        )
        for s in seeds
    ]
    margins = np.stack([run[MARGIN].to_numpy() for run in runs])
    return runs[0].with_columns(pl.Series(MARGIN, margins.mean(axis=0), dtype=pl.Float64)), margins


def stacked_cross_fits(
    frame: pl.DataFrame,
    *,
    folds: int,
    seeds: list[int],
    fit_options: dict[str, Any] | None,
    device: str,
    on_fold: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One cross-fit per seed of ``seeds``, every fold model of every cross-fit trained in one stack:
    (fold of each pair, out-of-fold margins), each (len(seeds) × pairs); None when the fold models are not
    MLPs the stack can train exactly as separate fits (``prefnoise.reward.folds.stackable``)."""
    # pulls torch: loaded only when a reward model runs
    from prefnoise.reward import fold_of_pair_id
    from prefnoise.reward.folds import fit_stacked, stackable, stacked_margins  # pulls torch, as above
    from prefnoise.reward.task import prepared_features  # pulls torch, as above

    _check_folds(frame, folds)
    config = fit_reward_config(**{"loss": "sigmoid", **(fit_options or {}), "device": device}).for_backend()
    if stackable(config) is not None:
        return None
    sides = prepared_features(config, frame)
    assignments = np.stack([np.asarray(fold_of_pair_id(frame[C.PAIR_ID], folds, s)) for s in seeds])
    members = [(r, k) for r in range(len(seeds)) for k in range(folds)]
    rows = [np.flatnonzero(assignments[r] != k) for r, k in members]
    groups: dict[int, list[int]] = {}  # members with the same steps per epoch share a stack
    for i, train in enumerate(rows):
        groups.setdefault(-(-len(train) // config.batch_size), []).append(i)
    margins = np.full(assignments.shape, np.nan)
    for group in groups.values():
        stack = fit_stacked(config, sides, [rows[i] for i in group], [seeds[members[i][0]] + members[i][1]
                                                                       for i in group])
        scored = stacked_margins(stack, sides)
        for j, i in enumerate(group):
            r, k = members[i]
            held_out = assignments[r] == k
            margins[r, held_out] = scored[j, held_out]
        if on_fold is not None:
            on_fold(len(group))
    return assignments, margins


def _check_folds(frame: pl.DataFrame, folds: int) -> None:
    """PrefnoiseError when ``folds`` cannot cross-fit ``frame``."""
    if folds < 2:
        raise PrefnoiseError(f"--folds must be at least 2, got {folds}")
    if frame.height < 2 * folds:
        raise PrefnoiseError(f"{frame.height} pairs are too few for {folds} folds; use fewer --folds")


def given_margins(
    frame: pl.DataFrame, *, reward_col: str | None = None, margin_col: str | None = None, name: str = "data"
) -> pl.DataFrame:
    """``frame`` with ``oof_margin`` from precomputed predictions: ``chosen_COL − rejected_COL`` for
    ``reward_col`` COL, or the ``margin_col`` column (margin = reward(chosen) − reward(rejected)). A null,
    NaN or infinite value is a PrefnoiseError naming ``name`` (the file), its row (1-based) and column."""

    if (reward_col is None) == (margin_col is None):
        raise PrefnoiseError("give exactly one of --reward-col and --margin-col")
    needed = [margin_col] if margin_col is not None else [C.chosen(reward_col), C.rejected(reward_col)]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise PrefnoiseError(f"{name}: column {missing[0]!r} not found; the table has {C.name_list(frame.columns)}")
    values = []
    for column in needed:
        try:
            numbers = frame[column].cast(pl.Float64, strict=True)
        except Exception:  # polars raises several types for a column that is not numeric
            raise PrefnoiseError(f"{name}: column {column!r} must hold numbers, it is {frame[column].dtype}") from None
        bad = (numbers.is_null() | ~numbers.is_finite()).arg_true()
        if bad.len():
            row = int(bad[0])
            value = numbers[row]
            what = "a missing value (null)" if value is None else "nan" if np.isnan(value) else \
                "inf" if value > 0 else "-inf"
            more = f", and {bad.len() - 1} more row(s)" if bad.len() > 1 else ""
            raise PrefnoiseError(
                f"{name}: column {column!r} has {what} at row {row + 1}{more}; a margin needs a finite number "
                "in every row: fix those scores or leave their rows out"
            )
        values.append(numbers.to_numpy())
    margin = values[0] if margin_col is not None else values[0] - values[1]
    seen = ~unseen_mask(frame)
    if seen.any():
        raise PrefnoiseError(
            f"{int(seen.sum())} rows were seen by the model that scored them ({IN_TRAINING}/{IN_VALIDATION} "
            f"true, first row {int(np.flatnonzero(seen)[0]) + 1}); their margins are not out of sample: "
            "audit only held-out rows (filter on those columns) or score with a model that never saw them"
        )
    return frame.with_columns(pl.Series(MARGIN, margin, dtype=pl.Float64))

