"""One audit of a table under its :class:`~prefnoise.options.audit.AuditOptions`: the evidence (other
annotators' votes, given margins or cross-fitted fold models), the estimate, suspicion, the fix and the
summary that ``audit --json`` prints. Reading the input and writing the outputs are the caller's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.noise_audit import breakdowns as B
from prefnoise.noise_audit import reuse as R
from prefnoise.noise_audit import votes as V
from prefnoise.noise_audit.annotators import AnnotatorAudit, audit_with_annotators
from prefnoise.noise_audit.cross_fit import cross_fitted_margins, given_margins
from prefnoise.noise_audit.estimate import UNDETERMINED_EXIT, NoiseEstimate, estimate_noise_rate
from prefnoise.noise_audit.fix import add_suspicion, clean_table, most_suspect
from prefnoise.noise_audit.gold import GoldEstimate, gold_evidence, gold_wrong
from prefnoise.noise_audit.names import CONSENSUS, FOLD, MARGIN, SUSPICION
from prefnoise.noise_audit.ranking import auroc, precision_at
from prefnoise.options.audit import AuditOptions

ANNOTATOR_BACKEND = "Dawid-Skene on the annotators' votes"  # what "backend" says when no model is fitted


@dataclass
class AuditOutcome:
    """The audited table (suspicion and margins or consensus; cleaned with ``fix``), the estimate
    (a NoiseEstimate, or an AnnotatorAudit with annotators), the summary, and the parameters and
    estimate the history entry records."""

    table: pl.DataFrame
    estimate: NoiseEstimate | AnnotatorAudit | GoldEstimate
    summary: dict[str, Any]
    parameters: dict[str, Any]
    history_estimate: dict[str, Any]


def run_audit(
    frame: pl.DataFrame,
    options: AuditOptions,
    *,
    name: str = "data",
    votes: pl.DataFrame | None = None,
    drop_invalid: bool = False,
    on_fold: Callable[[int], None] | None = None,
    reuse_margins: bool = False,
) -> AuditOutcome:
    """Audit ``frame`` (``name`` in messages): with ``options.annotators`` and/or ``votes`` (the long table
    ``options.votes`` names, already read), Dawid–Skene; otherwise margins given or cross-fitted. ``fix``
    refuses with exit code 4 when the rate is undetermined. Fold-model margins are kept for later runs
    (:mod:`prefnoise.noise_audit.reuse`); ``reuse_margins`` reads them back when data and options match (the
    summary's ``margins_note`` says whether they were)."""
    if options.with_annotators:
        scored, estimate, extra, parameters = _annotator_evidence(frame, options, votes)
    else:
        scored, estimate, extra, parameters = _margin_evidence(frame, options, name, drop_invalid, on_fold,
                                                               reuse_margins)
    if options.fix is not None and not estimate.identifiable:
        raise PrefnoiseError(
            f"--fix: the flip rate is undetermined, so suspicion has no calibration; nothing written "
            f"({estimate.reason})",
            exit_code=UNDETERMINED_EXIT,
        )
    fixed = 0
    if options.fix is not None:
        named = (*(options.annotators or ()), options.position_col, options.gold)
        vote_columns = tuple(c for c in named if c is not None)
        scored, fixed = clean_table(scored, mode=options.fix, threshold=options.threshold, vote_columns=vote_columns)
    calibrated = scored[SUSPICION].null_count() < scored.height
    above = int((scored[SUSPICION] > options.threshold).sum()) if options.fix is None else 0
    suspects = above if calibrated else None
    summary: dict[str, Any] = {
        **extra,
        "suspects_above_threshold": suspects,
        "threshold": options.threshold,
        "fixed": {"mode": options.fix, "count": fixed} if options.fix else None,
        "most_suspect": most_suspect(scored, options.show_suspects, with_text=options.show_text),
    }
    if C.FLIPPED in scored.columns and options.fix is None and scored[C.FLIPPED].n_unique() == 2:
        summary["against_flipped"] = against_flipped(scored)
    parameters = {**parameters, "fix": options.fix, "threshold": options.threshold}
    return AuditOutcome(scored, estimate, summary, parameters, _history_estimate(estimate))


def against_flipped(scored: pl.DataFrame) -> dict[str, float]:
    """How the suspicion ranking finds the pairs a ``flipped`` column marks (the margin's ranking when there
    are margins: it is defined also when ε̂ is undetermined)."""
    flipped = scored[C.FLIPPED].to_numpy().astype(bool)
    if MARGIN in scored.columns:
        suspicion = -scored[MARGIN].to_numpy()
    else:
        suspicion = scored[SUSPICION].fill_null(0.5).to_numpy()
    return {
        "true_rate": float(flipped.mean()),
        "auroc": auroc(suspicion, flipped),
        "precision_at_true_count": precision_at(suspicion, flipped, int(flipped.sum())),
    }


def vote_matrix(
    frame: pl.DataFrame, options: AuditOptions, votes: pl.DataFrame | None
) -> tuple[list[str], np.ndarray]:
    """Annotator names and the (pairs × annotators) vote codes from the table's columns and the long table."""
    names: list[str] = []
    blocks = []
    if options.annotators is not None:
        names += list(options.annotators)
        blocks.append(V.annotator_columns(frame, list(options.annotators)))
    if votes is not None:
        long_names, codes = V.long_votes(votes, frame[C.PAIR_ID], source=f"--votes {options.votes}")
        clash = sorted(set(names) & set(long_names))
        if clash:
            raise PrefnoiseError(f"--votes: annotator {clash[0]!r} is also an --annotators column; rename one")
        names += long_names
        blocks.append(codes)
    return names, np.hstack(blocks)


def breakdown_sides(frame: pl.DataFrame, rules: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each ``--by`` rule, its sides (A, B) on ``frame``; missing columns are one-line errors."""
    sides = {}
    for rule in rules:
        kind, _, name = rule.partition(":")
        needed = [C.chosen(name), C.rejected(name)] if kind == "compare" else [name.split(".")[0]] if name else []
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise PrefnoiseError(
                f"--by {rule}: column {missing[0]!r} not found; the table has {C.name_list(frame.columns)}"
            )
        sides[rule] = B.rule_sides(frame, rule)
    return sides


def gold_breakdowns(frame: pl.DataFrame, options: AuditOptions) -> list[dict[str, Any]]:
    """The breakdowns (``--position-col``, ``--by``) on the gold pairs alone: each gold vote for chosen or
    rejected says exactly whether the table's label is wrong (gold ties are left out), with a pair bootstrap."""
    wrong = gold_wrong(frame[options.gold], options.gold)
    strict = np.isin(wrong, (0.0, 1.0))
    named = {}
    if options.position_col is not None:
        named[B.POSITION] = B.position_sides(_chosen_first(frame, options.position_col))
    named.update(breakdown_sides(frame, options.by or ()))
    return [
        B.bootstrap_breakdown(rule, wrong[strict], a[strict], b[strict], draws=options.bootstrap, seed=options.seed)
        for rule, (a, b) in named.items()
    ]


def _chosen_first(frame: pl.DataFrame, column: str) -> np.ndarray:
    """Whether ``chosen`` was shown first, from the ``--position-col`` column."""
    if column not in frame.columns:
        raise PrefnoiseError(f"--position-col: column {column!r} not found; the table has {C.name_list(frame.columns)}")
    return V.position_codes(frame[column], column)


def _annotator_evidence(
    frame: pl.DataFrame, options: AuditOptions, votes: pl.DataFrame | None
) -> tuple[pl.DataFrame, AnnotatorAudit, dict[str, Any], dict[str, Any]]:
    """The table with suspicion and consensus, the annotator audit, its summary part and parameters."""
    names, codes = vote_matrix(frame, options, votes)
    chosen_first = None if options.position_col is None else _chosen_first(frame, options.position_col)
    groups = breakdown_sides(frame, options.by or ())
    audit = audit_with_annotators(
        codes, names, chosen_first=chosen_first, groups=groups, bootstrap=options.bootstrap, seed=options.seed
    )
    scored = frame.with_columns(  # null while the rate is undetermined
        pl.Series(SUSPICION, audit.suspicion, dtype=pl.Float64) if audit.suspicion is not None
        else pl.lit(None, dtype=pl.Float64).alias(SUSPICION),
        pl.Series(CONSENSUS, audit.consensus, dtype=pl.String) if audit.consensus is not None
        else pl.lit(None, dtype=pl.String).alias(CONSENSUS),
    )
    extra = {
        "input": None, "pairs": frame.height, "method": "annotators", "folds": None, "refits": None, "loss": None,
        "backend": ANNOTATOR_BACKEND, "margins_from": "no margins: the annotators' votes",
        "identifiable": audit.identifiable, "noise_rate": {**audit.to_dict(), "mixture": None},
        "annotators": audit.annotators, "breakdowns": audit.breakdowns,
    }
    parameters = {"annotators": names, "position_col": options.position_col, "by": list(options.by or ())}
    return scored, audit, extra, parameters


def _margin_evidence(
    frame: pl.DataFrame,
    options: AuditOptions,
    name: str,
    drop_invalid: bool,
    on_fold: Callable[[int], None] | None,
    reuse_margins: bool = False,
) -> tuple[pl.DataFrame, NoiseEstimate | GoldEstimate, dict[str, Any], dict[str, Any]]:
    """The table with out-of-fold margins and suspicion, ε̂, its summary part and parameters."""
    # reason: prefnoise.reward imports torch, which only the fold-model path needs
    from prefnoise.reward import check_finite_features

    note = None
    if options.given_margins:
        scored = given_margins(frame, reward_col=options.reward_col, margin_col=options.margin_col, name=name)
        margins = scored[MARGIN].to_numpy()
        backend = "given predictions"
        parameters: dict[str, Any] = {"reward_col": options.reward_col, "margin_col": options.margin_col}
    else:
        frame, _ = check_finite_features(frame, name, drop_invalid)
        scored, margins, backend, parameters, note = _fold_margins(frame, options, name, reuse_margins, on_fold)
    estimate = estimate_noise_rate(margins, n_boot=options.bootstrap, seed=options.seed)
    if options.gold is not None:  # the gold pairs correct the models' scores; the single-label verdict stays beside
        scored, gold, extra = gold_evidence(scored, options.gold)
        extra = {"input": None, "pairs": frame.height, "folds": None if options.given_margins else options.folds,
                 "refits": None if options.given_margins else options.refits,
                 "loss": None if options.given_margins else options.loss, "backend": backend,
                 "margins_from": _margins_from(options.reward_col, options.margin_col), **extra,
                 "model_only": estimate.to_dict(), "breakdowns": gold_breakdowns(scored, options),
                 **({"margins_note": note} if note is not None else {})}
        extra["noise_rate"] = {"mixture": None, **extra["noise_rate"]}  # the --json contract's key
        return scored, gold, extra, {**parameters, "gold": options.gold}
    given = options.given_margins
    extra = {
        "input": None, "pairs": frame.height, "folds": None if given else options.folds,
        "refits": None if given else options.refits, "loss": None if given else options.loss, "backend": backend,
        "margins_from": _margins_from(options.reward_col, options.margin_col), "identifiable": estimate.identifiable,
        "noise_rate": estimate.to_dict(), **({"margins_note": note} if note is not None else {}),
    }
    return add_suspicion(scored, estimate.mixture), estimate, extra, parameters


def _fold_margins(
    frame: pl.DataFrame, options: AuditOptions, name: str, reuse: bool, on_fold: Callable[[int], None] | None
) -> tuple[pl.DataFrame, np.ndarray, str, dict[str, Any], str | None]:
    """Cross-fitted margins (kept for later runs, or with ``reuse`` read back when they match): the table with
    ``fold`` and ``oof_margin``, the (refits × pairs) margins, the backend, the parameters and a note (reuse only)."""
    from prefnoise.reward.backend import backend_of  # pulls torch: loaded only when a reward model runs

    backend, model_path = backend_of(options.model, C.chosen(C.FEATURES) in frame.columns)
    fit_options = {
        "loss": options.loss, "backend": backend, "model_path": model_path, "encoder_path": options.encoder,
        "embed_features": options.embed_features, "epochs": options.epochs, "batch_size": options.batch_size,
        "lr": options.lr, "hidden": options.hidden, "max_length": options.max_length, "val_fraction": 0.0,
        "head": options.head,
    }
    parameters = {"folds": options.folds, "refits": options.refits,
                  **{k: v for k, v in fit_options.items() if v is not None}}
    fingerprint = R.margins_fingerprint(frame, {**parameters, "seed": options.seed, "device": options.device})
    slot = R.slot_path(name)
    kept, note = R.read_kept_margins(slot, fingerprint, frame) if reuse else (None, None)
    if kept is not None:
        scored = frame.with_columns(pl.Series(FOLD, kept.fold, dtype=pl.Int32),
                                    pl.Series(MARGIN, kept.margins.mean(axis=0), dtype=pl.Float64))
        return scored, kept.margins, backend, parameters, note
    scored, margins = cross_fitted_margins(
        frame, folds=options.folds, refits=options.refits, seed=options.seed, fit_options=fit_options,
        device=options.device, on_fold=on_fold,
    )
    R.keep_margins(slot, fingerprint, frame, scored[FOLD].to_numpy(), margins)
    return scored, margins, backend, parameters, note


def _margins_from(reward_col: str | None, margin_col: str | None) -> str:
    if margin_col is not None:
        return f"column {margin_col}"
    if reward_col is not None:
        return f"columns {C.chosen(reward_col)} − {C.rejected(reward_col)}"
    return "cross-fitted fold models"


def _history_estimate(estimate: NoiseEstimate | AnnotatorAudit | GoldEstimate) -> dict[str, Any]:
    """What the history records of the estimate: the rate (None when undetermined, with the reason)."""
    if isinstance(estimate, GoldEstimate):
        keys = ("rate", "low", "high", "identifiable", "reason", "method", "gold_pairs", "gold_low", "gold_high")
        return {key: getattr(estimate, key) for key in keys}
    if isinstance(estimate, AnnotatorAudit):
        return {key: estimate.noise_rate[key] for key in ("rate", "low", "high", "identifiable", "reason", "method")}
    return {
        "rate": estimate.rate,
        "low": estimate.low,
        "high": estimate.high,
        "identifiable": estimate.identifiable,
        "reason": estimate.reason,
        "own_error_bias_high": estimate.own_error_bias_high,
        "refits": [r["rate"] for r in estimate.refits],
    }
