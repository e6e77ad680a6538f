"""pn.audit: estimate how noisy a table's labels are (the `audit` command)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.tables import (
    ProgressBar,
    Table,
    check_api_options,
    gather_input_options,
    input_table,
    no_bar,
    path_of,
)
from prefnoise.errors import PrefnoiseError


@dataclass
class AuditResult:
    """``pn.audit``'s result: the table with ``oof_margin`` (and ``fold``, ``suspicion``; cleaned with ``fix``),
    the noise estimate (``estimate.identifiable``, ``estimate.rate``: None when undetermined, with
    ``estimate.reason``), and the summary (``audit --json``'s object)."""

    table: pl.DataFrame
    estimate: Any
    summary: dict[str, Any]


def audit(
    data: Table,
    out: str | Path | None = None,
    *,
    folds: int = 5,
    refits: int = 3,
    reward_col: str | None = None,
    margin_col: str | None = None,
    loss: str = "sigmoid",
    model: str | None = None,
    encoder: str | None = None,
    embed_features: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    hidden: int = 256,
    max_length: int | None = None,
    head: str | None = None,
    device: str = "auto",
    bootstrap: int = 200,
    show_suspects: int = 10,
    show_text: bool = False,
    plot: str | Path | None = None,
    fix: str | None = None,
    threshold: float = 0.5,
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> AuditResult:
    """``prefnoise audit``: cross-fit reward models (``folds`` × ``refits``), estimate the flip rate ε̂ and
    score each pair's suspicion; or take out-of-sample margins as given (``reward_col``/``margin_col``).

    Wraps :mod:`prefnoise.noise_audit` as the CLI does. When ε̂ is undetermined (``result.estimate.identifiable``
    False) the summary's rate is None with a reason, and ``fix`` ("drop" or "swap", with ``out``) refuses
    with a PrefnoiseError of exit code 4.
    """
    from prefnoise import noise_audit as A
    from prefnoise.data import new_history_entry, write_table
    from prefnoise.outputs import check_distinct_outputs, check_output_file
    from prefnoise.reward import check_finite_features
    from prefnoise.reward.backend import backend_of

    check_api_options(locals())
    if fix is not None and out is None:
        raise PrefnoiseError("--fix needs --out for the cleaned table")
    if fix is not None and fix not in ("drop", "swap"):
        raise PrefnoiseError(f"--fix must be 'drop' or 'swap', got {fix!r}")
    if reward_col is not None and margin_col is not None:
        raise PrefnoiseError("give only one of --reward-col and --margin-col")
    started = time.time()  # the history entry's duration covers the folds, not only the writing
    check_output_file(out, inputs=[path_of(data)], overwrite=overwrite)
    check_output_file(plot, inputs=[path_of(data)], overwrite=overwrite, flag="--plot", suffix=".png")
    check_distinct_outputs({"--out": out, "--plot": plot})
    src = input_table(
        data, gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options)
    )
    given = reward_col is not None or margin_col is not None
    if given:
        frame = src.collect()
        scored = A.given_margins(frame, reward_col=reward_col, margin_col=margin_col)
        margins = scored[A.MARGIN].to_numpy()
        backend, parameters = "given predictions", {"reward_col": reward_col, "margin_col": margin_col}
    else:
        frame, _ = check_finite_features(src.collect(), src.name, drop_invalid)
        backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
        fit_options = {
            "loss": loss, "backend": backend, "model_path": model_path, "encoder_path": encoder,
            "embed_features": embed_features, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "hidden": hidden, "max_length": max_length, "val_fraction": 0.0,
            "head": head,
        }
        with (progress_bar or no_bar)("cross-fitting folds", folds * refits) as advance:
            scored, margins = A.cross_fitted_margins(
                frame, folds=folds, refits=refits, seed=seed, fit_options=fit_options, device=device, on_fold=advance
            )
        parameters = {"folds": folds, "refits": refits, **{k: v for k, v in fit_options.items() if v is not None}}
    estimate = A.estimate_noise_rate(margins, n_boot=bootstrap, seed=seed)
    if fix is not None and not estimate.identifiable:
        raise PrefnoiseError(
            f"--fix: the flip rate is undetermined, so suspicion has no calibration; nothing written "
            f"({estimate.reason})",
            exit_code=A.UNDETERMINED_EXIT,
        )
    scored = A.add_suspicion(scored, estimate.mixture)
    fixed = 0
    if fix is not None:
        scored, fixed = A.clean_table(scored, mode=fix, threshold=threshold)
    if out is not None:
        entry = new_history_entry("audit", {**parameters, "fix": fix, "threshold": threshold}, seed=seed,
                                  source=src.source)
        entry.started = started
        entry.extra["noise_estimate"] = _history_estimate(estimate)
        if fix is not None:
            entry.extra["fixed_pairs"] = {"mode": fix, "count": fixed}
        write_table(scored, out, entry=entry, overwrite=overwrite)
    if plot is not None:
        from prefnoise.experiments.figures import margin_histogram

        margin_histogram(scored[A.MARGIN].to_numpy(), estimate.mixture, plot)
    suspects = None if estimate.mixture is None else int((scored[A.SUSPICION] > threshold).sum()) if fix is None else 0
    summary: dict[str, Any] = {
        "input": src.name,
        "pairs": frame.height,
        "folds": None if given else folds,
        "refits": None if given else refits,
        "loss": None if given else loss,
        "backend": backend,
        "margins_from": _margins_from(reward_col, margin_col),
        "identifiable": estimate.identifiable,
        "noise_rate": estimate.to_dict(),
        "suspects_above_threshold": suspects,
        "threshold": threshold,
        "fixed": {"mode": fix, "count": fixed} if fix else None,
        "most_suspect": A.most_suspect(scored, show_suspects, with_text=show_text),
    }
    if C.FLIPPED in scored.columns and fix is None and scored[C.FLIPPED].n_unique() == 2:
        flipped = scored[C.FLIPPED].to_numpy()
        suspicion = -scored[A.MARGIN].to_numpy()  # suspicion's ranking, defined also when ε̂ is undetermined
        summary["against_flipped"] = {
            "true_rate": float(flipped.mean()),
            "auroc": A.auroc(suspicion, flipped),
            "precision_at_true_count": A.precision_at(suspicion, flipped, int(flipped.sum())),
        }
    return AuditResult(scored, estimate, summary)


def _margins_from(reward_col: str | None, margin_col: str | None) -> str:
    if margin_col is not None:
        return f"column {margin_col}"
    if reward_col is not None:
        return f"columns {C.chosen(reward_col)} − {C.rejected(reward_col)}"
    return "cross-fitted fold models"


def _history_estimate(estimate: Any) -> dict[str, Any]:
    """What the history records of ε̂: the rate (None when undetermined, with the reason) and how it was made."""
    return {
        "rate": estimate.rate,
        "low": estimate.low,
        "high": estimate.high,
        "identifiable": estimate.identifiable,
        "reason": estimate.reason,
        "own_error_bias_high": estimate.own_error_bias_high,
        "refits": [r["rate"] for r in estimate.refits],
    }
