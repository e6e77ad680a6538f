"""`prefnoise audit DATA`: estimate a dataset's flip rate and find the suspect pairs.

When the out-of-fold margins cannot separate flips from the fold models' own mistakes (a model near
chance, too few pairs), the rate is *undetermined*: the text names the reason, ``--json`` has
``"rate": null`` with a ``reason``, and ``--estimate-only`` and ``--fix`` exit 4 (nothing printed on stdout,
nothing fixed).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer
from rich.table import Table

from prefnoise import api
from prefnoise import columns as C
from prefnoise import noise_audit as A
from prefnoise.cli.app import app
from prefnoise.cli.common import (
    ChosenColOption,
    ChosenScoreColOption,
    ConfigOption,
    DeviceOption,
    DropInvalidOption,
    EncoderOption,
    EngineOption,
    HiddenOption,
    JsonOption,
    LayoutOption,
    OverwriteOption,
    PairsArgument,
    PromptColOption,
    RayAddressOption,
    RejectedColOption,
    RejectedScoreColOption,
    RewardModelOption,
    SeedOption,
    SplitOption,
    WorkersOption,
    cli_errors,
    console,
    emit_json,
    engine_options,
    input_options,
    options_from,
    progress,
    quiet_requested,
    register_engine,
    register_options,
    reports_to_stderr,
    safe,
    show_progress,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.options.audit import AuditOptions

AnnotatorsOption = Annotated[
    str | None,
    typer.Option(
        "--annotators",
        help="COL[,COL...]: columns holding other annotators' votes on each pair ('chosen'/'rejected'/'tie', "
        "1/-1/0 or true/false = prefers chosen; null = not annotated). Audits the table's labels with "
        "Dawid-Skene instead of fold models.",
    ),
]
VotesOption = Annotated[
    str | None, typer.Option("--votes", help="A long table of votes (pair_id, annotator, vote), as --annotators.")
]
PositionColOption = Annotated[
    str | None,
    typer.Option(
        "--position-col",
        help="With annotators: column saying which response was shown first ('chosen'/'rejected', 1/-1, "
        "true = chosen first); adds position bias and a position breakdown.",
    ),
]
ByOption = Annotated[
    list[str] | None,
    typer.Option(
        "--by",
        help="With annotators: flip rates per group, as corrupt's rules: longer, column:NAME, compare:NAME "
        "(repeat for several).",
    ),
]
GoldOption = Annotated[
    str | None,
    typer.Option(
        "--gold",
        help="COL: trusted votes on a random subset of pairs (as --annotators' encodings; null elsewhere). The "
        "gold pairs correct the fold models' margins (prediction-powered inference); the gold-only interval "
        "is shown beside it.",
    ),
]
FoldsOption = Annotated[int, typer.Option("--folds", help="Cross-fitting folds (split by pair_id hash).")]
RefitsOption = Annotated[
    int, typer.Option("--refits", help="Independent cross-fits (other folds and seeds), pooled into ε̂'s interval.")
]
RewardColOption = Annotated[
    str | None,
    typer.Option(
        "--reward-col",
        help="Use precomputed rewards chosen_COL − rejected_COL (e.g. 'reward' from `prefnoise score`) as the "
        "margins instead of fitting fold models; valid only for out-of-sample predictions.",
    ),
]
MarginColOption = Annotated[
    str | None,
    typer.Option("--margin-col", help="Use a precomputed margin column (reward(chosen) − reward(rejected))."),
]
LossOption = Annotated[str, typer.Option("--loss", help="Margin loss of the fold models (a symmetric one is robust).")]
HeadOption = Annotated[
    str | None, typer.Option("--head", help="transformer --model: sequence-classification or pooled (as fit-reward).")
]
EmbedFeaturesOption = Annotated[
    str | None,
    typer.Option("--embed-features", help="embed+mlp: what the MLP reads (as fit-reward's --embed-features)."),
]
EpochsOption = Annotated[int | None, typer.Option("--epochs", help="Epochs per fold model (fit-reward's default).")]
PairsPerStepOption = Annotated[int | None, typer.Option("--batch-size", help="Pairs per step.")]
LrOption = Annotated[float | None, typer.Option("--lr", help="Learning rate.")]
MaxLengthOption = Annotated[int | None, typer.Option("--max-length", help="Token limit (text backends).")]
BootstrapOption = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for ε̂'s interval.")]
ShowSuspectsOption = Annotated[int, typer.Option("--show-suspects", help="How many of the most suspect pairs to list.")]
ShowTextOption = Annotated[bool, typer.Option("--show-text", help="Include prompt and responses of the listed pairs.")]
PlotOption = Annotated[
    str | None, typer.Option("--plot", help="Histogram of out-of-fold margins with the fitted mixture (PNG).")
]
FixOption = Annotated[str | None, typer.Option("--fix", help="With --out: 'drop' suspects or 'swap' them back.")]
ThresholdOption = Annotated[float, typer.Option("--threshold", help="--fix acts on pairs with suspicion above this.")]
EstimateOnlyOption = Annotated[
    bool,
    typer.Option(
        "--estimate-only", help="Print only ε̂ (for align --noise-rate $(...)); exit 4 when it is undetermined."
    ),
]
OutTableOption = Annotated[
    str | None,
    typer.Option("--out", help="Write the table with fold, oof_margin and suspicion columns (- for stdout)."),
]


register_options("audit", AuditOptions)
register_engine("audit")


@app.command("audit")
@cli_errors
def audit_command(
    data: PairsArgument,
    out: OutTableOption = None,
    annotators: AnnotatorsOption = AuditOptions.annotators,
    votes: VotesOption = AuditOptions.votes,
    position_col: PositionColOption = AuditOptions.position_col,
    by: ByOption = AuditOptions.by,
    gold: GoldOption = AuditOptions.gold,
    folds: FoldsOption = AuditOptions.folds,
    refits: RefitsOption = AuditOptions.refits,
    reward_col: RewardColOption = AuditOptions.reward_col,
    margin_col: MarginColOption = AuditOptions.margin_col,
    loss: LossOption = AuditOptions.loss,
    model: RewardModelOption = AuditOptions.model,
    encoder: EncoderOption = AuditOptions.encoder,
    head: HeadOption = AuditOptions.head,
    embed_features: EmbedFeaturesOption = AuditOptions.embed_features,
    epochs: EpochsOption = AuditOptions.epochs,
    batch_size: PairsPerStepOption = AuditOptions.batch_size,
    lr: LrOption = AuditOptions.lr,
    hidden: HiddenOption = AuditOptions.hidden,
    max_length: MaxLengthOption = AuditOptions.max_length,
    device: DeviceOption = AuditOptions.device,
    bootstrap: BootstrapOption = AuditOptions.bootstrap,
    show_suspects: ShowSuspectsOption = AuditOptions.show_suspects,
    show_text: ShowTextOption = AuditOptions.show_text,
    plot: PlotOption = None,
    fix: FixOption = AuditOptions.fix,
    threshold: ThresholdOption = AuditOptions.threshold,
    estimate_only: EstimateOnlyOption = False,
    overwrite: OverwriteOption = False,
    seed: SeedOption = AuditOptions.seed,
    json_output: JsonOption = False,
    prompt_col: PromptColOption = C.PROMPT,
    chosen_col: ChosenColOption = C.CHOSEN,
    rejected_col: RejectedColOption = C.REJECTED,
    layout: LayoutOption = "auto",
    drop_invalid: DropInvalidOption = False,
    chosen_score_col: ChosenScoreColOption = None,
    rejected_score_col: RejectedScoreColOption = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Cross-fit reward models, estimate the flip rate ε̂ and score each pair's suspicion.

    Exit 4 with --estimate-only or --fix when ε̂ is undetermined (the fold models cannot tell flips from
    their own mistakes); the JSON report then has "rate": null and a "reason".
    """
    result = api.audit(
        data, out, options_from(AuditOptions, locals()), plot=plot, overwrite=overwrite,
        progress_bar=functools.partial(progress, enabled=show_progress(estimate_only or json_output)),
        engine=engine_options(locals()), reuse_margins=estimate_only or fix is not None,
        **input_options(locals()),
    )
    if result.summary.get("margins_note") and not quiet_requested():
        typer.echo(f"audit: {result.summary['margins_note']}", err=True)
    if estimate_only:
        _print_estimate(result.estimate)
    elif json_output:
        emit_json(result.summary, to_stderr=out == "-")
    else:
        reports_to_stderr(out == "-")
        _print_report(result.summary)


def _print_estimate(estimate: Any) -> None:
    """ε̂ alone, on stdout (--estimate-only); exit 4 when it is undetermined."""
    if not estimate.identifiable:
        raise PrefnoiseError(f"flip rate undetermined: {estimate.reason}", exit_code=A.UNDETERMINED_EXIT)
    typer.echo(f"{estimate.rate:.4f}")


def _print_report(report: dict) -> None:
    if report.get("method") == "annotators":
        _print_annotators(report)
    elif report.get("method") == "gold":
        _print_gold(report)
    else:
        _print_margins(report)
    _print_breakdowns(report)
    _print_suspects(report)


def _print_breakdowns(report: dict) -> None:
    """The table's flip rate per group (annotators: posterior-weighted pairs; gold: the gold pairs)."""
    for breakdown in report.get("breakdowns") or ():
        console.print(f"flip rate by {safe(breakdown['rule'])}:")
        for side in ("positive", "negative"):
            group = breakdown[side]
            console.print(f"  {safe(group['group'])}: {_interval(group)} (~{group['pairs']:.0f} pairs)")
        console.print(f"  difference: {_interval(breakdown['difference'])}")


def _interval(rate: dict) -> str:
    """``0.123 [0.100–0.150]`` (no interval without a bootstrap, – for none)."""
    if rate is None or rate["rate"] is None:
        return "–"
    if rate["low"] is None:
        return f"{rate['rate']:.3f}"
    return f"{rate['rate']:.3f} [{rate['low']:.3f}–{rate['high']:.3f}]"


def _print_annotators(report: dict) -> None:
    rate = report["noise_rate"]
    console.print(
        f"audit: {report['pairs']:,} pairs, the table's labels against {rate['annotators']} other annotators "
        f"(Dawid–Skene, {rate['frame']} frame)"
    )
    if rate["rate"] is None:
        console.print(f"flip rate of the table's labels: undetermined — {safe(rate['reason'])}")
        return
    interval = f" (95% interval {rate['low']:.3f}–{rate['high']:.3f})" if rate["low"] is not None else ""
    console.print(f"flip rate of the table's labels = {rate['rate']:.3f}{interval}")
    table = Table(title="annotators (a tie counts as half a flip)", title_justify="left")
    for column in ("annotator", "pairs", "flip rate [95%]", "ties", "position bias [95%]"):
        table.add_column(column, justify="left" if column == "annotator" else "right")
    for row in report["annotators"]:
        table.add_row(
            safe(row["annotator"]), f"{row['pairs']:,}", _interval(row["flip_rate"]), f"{row['tie_rate']:.3f}",
            _interval(row["position_bias"]),
        )
    console.print(table)


def _print_gold(report: dict) -> None:
    rate = report["noise_rate"]
    source = safe(report["margins_from"])
    console.print(
        f"audit: {report['pairs']:,} pairs, {rate['gold_pairs']:,} with a gold vote ({rate['gold_ties']} gold ties "
        f"left out); margins from the {source}"
    )
    if rate["rate"] is None or not rate["identifiable"]:
        console.print(f"flip rate of the table's labels: undetermined — {safe(rate['reason'])}")
        return
    console.print(
        f"flip rate of the table's labels = {rate['rate']:.3f} (95% interval {rate['low']:.3f}–{rate['high']:.3f}; "
        f"{safe(rate['interval'])})"
    )
    console.print(
        f"  gold pairs alone: {rate['gold_rate']:.3f} (exact 95% interval {rate['gold_low']:.3f}–"
        f"{rate['gold_high']:.3f})"
    )
    model = report["model_only"]
    alone = "undetermined" if model["rate"] is None else f"{model['rate']:.3f} [{model['low']:.3f}–{model['high']:.3f}]"
    console.print(f"  the fold models alone (single-label verdict): {alone}")


def _print_margins(report: dict) -> None:
    rate = report["noise_rate"]
    if report["folds"] is None:
        console.print(f"audit: {report['pairs']:,} pairs, margins from the {safe(report['margins_from'])}")
        console.print(
            "  these margins are valid only if the predictions were made out of sample (by a model that never "
            "saw these pairs); the interval does not include that model's own variability"
        )
    else:
        console.print(
            f"audit: {report['pairs']:,} pairs, {report['folds']} folds × {report['refits']} refits, "
            f"{report['backend']} with {report['loss']} loss"
        )
    if rate["rate"] is None:
        console.print(f"estimated flip rate ε̂: undetermined — {safe(rate['reason'])}")
    else:
        interval = f" (95% interval {rate['low']:.3f}–{rate['high']:.3f})" if rate["low"] is not None else ""
        if rate.get("close_pairs_note"):  # ε̂ counts only the flips the models can see; the interval is wider
            console.print(
                f"flip rate within {rate['low']:.3f}–{rate['high']:.3f} (95%); the flips the fold models can see "
                f"on confident pairs: ε̂ = {rate['rate']:.3f}"
            )
        else:
            console.print(f"estimated flip rate ε̂ = {rate['rate']:.3f}{interval}")
        per_refit = ", ".join(f"{r['rate']:.3f}" for r in rate["refits"])
        console.print(
            f"  corrected for the models' own confident mistakes: {rate['own_error_bias']:.3f} of "
            f"{rate['confident_pairs']:,} confident pairs (plausibly up to {rate['own_error_bias_high']:.3f})"
            + (f"; per refit {per_refit}" if len(rate["refits"]) > 1 else "")
        )
        if rate.get("close_pairs_note"):
            console.print(f"  the interval reaches up to the models' disagreement: {safe(rate['close_pairs_note'])}")


def _print_suspects(report: dict) -> None:
    if "against_flipped" in report:
        known = report["against_flipped"]
        console.print(
            f"against the `flipped` column: true rate {known['true_rate']:.3f}, AUROC {known['auroc']:.3f}, "
            f"precision at the true count {known['precision_at_true_count']:.3f}"
        )
    if report["fixed"]:
        console.print(
            f"--fix {report['fixed']['mode']}: {report['fixed']['count']:,} pairs above {report['threshold']}"
        )
    elif report["suspects_above_threshold"] is None and report.get("method") == "annotators":
        console.print("suspicion is null while the flip rate is undetermined")
    elif report["suspects_above_threshold"] is None:
        console.print("suspicion is not calibrated without ε̂ (null); pairs are listed by their margin")
    else:
        console.print(f"{report['suspects_above_threshold']:,} pairs have suspicion above {report['threshold']}")
    if report["most_suspect"]:
        table = Table(title="most suspect pairs", title_justify="left")
        shown = list(report["most_suspect"][0])
        if report.get("method") == "annotators":  # no margins: the contract's null oof_margin is not shown
            shown.remove("oof_margin")
        for column in shown:
            table.add_column(column, justify="right" if column in ("oof_margin", "suspicion") else "left")
        for row in report["most_suspect"]:
            values = [row[c] for c in shown]
            table.add_row(*[f"{v:.4f}" if isinstance(v, float) else "–" if v is None else safe(v) for v in values])
        console.print(table)
