"""`prefnoise reproduce alignment`: SymPO against the DPO family under label noise (paper Sec. 5.2, offline).

The paper fine-tunes Llama-3.2-3B and judges with GPT-4o-mini; offline, a tiny GPT-2 and the
generated ``quality_pairs`` task stand in, and held-out implicit-reward accuracy against the clean
labels stands in for the judge. Each cell (noise × loss × seed) runs the library functions behind
the commands a user would chain: ``corrupt`` (noise.corrupt_frame) → ``align`` (align.train, with a
validation split whose ``flipped`` column gives the clean accuracy).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise.experiments.tiny_lm import make_tiny_causal_lm, quality_pairs, quality_texts
from prefnoise.noise import NoiseSpec, corrupt_frame

# name → (policy loss, symmetric margin loss or None); the loss table itself lives in losses.py
LOSSES: dict[str, tuple[str, str | None]] = {
    "dpo": ("dpo", None),
    "cdpo": ("cdpo", None),
    "rdpo": ("rdpo", None),
    "ipo": ("ipo", None),
    "sympo-sigmoid": ("sympo", "sigmoid"),
    "sympo-ramp": ("sympo", "ramp"),
}
SYMMETRIC_LOSSES = ("sympo-sigmoid", "sympo-ramp")
RATES = (0.0, 0.2, 0.4)
ASYMMETRIC = ((0.3, 0.1),)  # (flip rate of first-better pairs, of the others)
CDPO_MIN_SMOOTHING = 0.1  # cDPO's usual ε when the data is believed clean
FIRST_BETTER = "first_better"


@dataclass(frozen=True)
class AlignmentConfig:
    """The grid and the training set-up of the alignment reproduction."""

    rates: tuple[float, ...] = RATES
    asymmetric: tuple[tuple[float, float], ...] = ASYMMETRIC
    losses: tuple[str, ...] = tuple(LOSSES)
    seeds: int = 3
    pairs: int = 800
    val_fraction: float = 0.5  # a large held-out half: 400 pairs give a standard error of about 0.02
    response_words: int = 8
    max_gap: int = 2
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.1
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 2

    @classmethod
    def quick(cls) -> AlignmentConfig:
        """A reduced grid for tests (its cells equal the full grid's seed-0 cells): clean and 40%, DPO vs SymPO."""
        return cls(rates=(0.0, 0.4), asymmetric=(), losses=("dpo", "sympo-sigmoid", "sympo-ramp"), seeds=1)

    def settings(self) -> list[tuple[str, float, NoiseSpec | None]]:
        """(kind, mean flip rate, noise spec or None for clean) for every noise column of the grid."""
        out: list[tuple[str, float, NoiseSpec | None]] = [
            ("symmetric", rate, NoiseSpec(kind="symmetric", rate=rate) if rate > 0 else None) for rate in self.rates]
        for pos, neg in self.asymmetric:
            spec = NoiseSpec(kind="asymmetric", rate_pos=pos, rate_neg=neg, by=f"column:{FIRST_BETTER}")
            out.append(("asymmetric", round((pos + neg) / 2, 6), spec))
        return out

    def cells(self) -> int:
        """Number of training runs in the grid."""
        return len(self.settings()) * len(self.losses) * self.seeds


def loss_options(name: str, rate: float) -> dict[str, Any]:
    """AlignConfig options for grid loss ``name`` when the mean flip rate is ``rate``.

    rDPO is given the true rate (its assumption); cDPO smooths with the rate, at least 0.1.
    """
    loss, symmetric = LOSSES[name]
    options: dict[str, Any] = {"loss": loss}
    if symmetric:
        options["symmetric_loss"] = symmetric
    if loss == "cdpo":
        options["label_smoothing"] = max(rate, CDPO_MIN_SMOOTHING)
    if loss == "rdpo":
        options["noise_rate"] = rate
    return options


def run_alignment(
    config: AlignmentConfig,
    *,
    device: str = "cpu",
    work: str | Path | None = None,  # where models and reference caches go (default: a temporary dir)
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> pl.DataFrame:
    """Run the grid; one row per (kind, rate, loss, seed) with held-out clean and noisy implicit-reward accuracy."""
    from prefnoise.policy import AlignConfig, train

    unknown = sorted(set(config.losses) - set(LOSSES))
    if unknown:
        from prefnoise.errors import PrefnoiseError

        raise PrefnoiseError(f"unknown alignment loss {', '.join(unknown)}; choose from {', '.join(LOSSES)}")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bars would interleave with the grid's
    scratch = tempfile.TemporaryDirectory(prefix="prefnoise-alignment-") if work is None else None
    root = Path(work if work is not None else scratch.name)  # type: ignore[union-attr]
    rows = []
    # Tiny models gain nothing from intra-op threads, and on a busy machine every small op then
    # waits for a descheduled thread (milliseconds each): one thread is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(config.seeds):
            model = make_tiny_causal_lm(root / f"lm-{seed}", quality_texts(), n_layer=config.n_layer,
                                        n_embd=config.n_embd, n_head=config.n_head, seed=seed)
            clean = quality_pairs(config.pairs, seed=seed, response_words=config.response_words,
                                  max_gap=config.max_gap, first_better_column=FIRST_BETTER)
            for kind, rate, spec in config.settings():
                if spec is None:
                    noisy, flips = clean.with_columns(flipped=pl.lit(False)), 0
                else:
                    noisy, stats = corrupt_frame(clean, replace(spec, seed=seed))
                    flips = stats.flips
                for name in config.losses:
                    started = time.perf_counter()
                    cfg = AlignConfig(
                        model=str(model), out=str(root / "run"), beta=config.beta, lr=config.lr,
                        batch_size=config.batch_size, batching="exact", epochs=config.epochs, seed=seed,
                        val_fraction=config.val_fraction, max_length=64, max_prompt_length=16,
                        log_every=10**9, device=device, precision="fp32",
                        ref_cache=str(root / f"ref-{seed}-{kind}-{rate}.parquet"),
                        **loss_options(name, rate),
                    )
                    summary = train(cfg, noisy, source=f"{kind} {rate}")
                    row = {
                        "kind": kind, "rate": rate, "loss": name, "symmetric": name in SYMMETRIC_LOSSES,
                        "seed": seed, "clean_accuracy": summary["val"]["clean_reward_accuracy"],
                        "noisy_accuracy": summary["val"]["reward_accuracy"],
                        "val_margin": summary["val"]["margin"], "train_flip_rate": flips / noisy.height,
                        "steps": summary["steps"], "seconds": round(time.perf_counter() - started, 3),
                    }
                    rows.append(row)
                    if on_cell is not None:
                        on_cell(row)
    finally:
        torch.set_num_threads(threads)
        if scratch is not None:
            scratch.cleanup()
    return pl.DataFrame(rows)


def summary(results: pl.DataFrame, metric: str = "clean_accuracy") -> pl.DataFrame:
    """Mean and std of ``metric`` per (loss, kind, rate), losses in the grid's order."""
    order = {loss: i for i, loss in enumerate(LOSSES)}
    return (
        results.group_by("loss", "symmetric", "kind", "rate")
        .agg(pl.col(metric).mean().alias("mean"), pl.col(metric).std().alias("std"), pl.len().alias("seeds"))
        .with_columns(pl.col("loss").replace_strict(order, default=len(order)).alias("__order"))
        .sort("__order", "kind", "rate", descending=[False, True, False])
        .drop("__order")
    )


def figure_summary(results: pl.DataFrame) -> pl.DataFrame:
    """``summary`` with the clean (rate 0) cells repeated under every noise kind, so each panel starts at 0."""
    table = summary(results)
    clean = table.filter((pl.col("kind") == "symmetric") & (pl.col("rate") == 0.0))
    others = [kind for kind in table["kind"].unique(maintain_order=True).to_list() if kind != "symmetric"]
    return pl.concat([table, *(clean.with_columns(kind=pl.lit(kind)) for kind in others)]).sort(
        "kind", "rate", descending=[True, False], maintain_order=True)


def summary_markdown(results: pl.DataFrame, config: AlignmentConfig, command: str) -> str:
    """A Markdown table: one row per loss, one column per noise setting, mean ± std of clean accuracy."""
    table = summary(results)
    columns = [(kind, rate) for kind, rate, _ in config.settings()]

    def label(kind: str, rate: float) -> str:
        if kind == "symmetric":
            return f"sym {rate:.1f}"
        pos, neg = config.asymmetric[[round((p + n) / 2, 6) for p, n in config.asymmetric].index(rate)]
        return f"asym {pos:.1f}/{neg:.1f}"

    lines = [
        "Held-out implicit-reward accuracy against the clean labels, mean ± std over "
        f"{config.seeds} seed(s); `{command}`.",
        "",
        "| loss | " + " | ".join(label(k, r) for k, r in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for loss in [x for x in LOSSES if x in config.losses]:
        cells = []
        for kind, rate in columns:
            match = table.filter((pl.col("loss") == loss) & (pl.col("kind") == kind) & (pl.col("rate") == rate))
            mean, std = match["mean"][0], match["std"][0]
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        name = f"**{loss}**" if loss in SYMMETRIC_LOSSES else loss
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Task: `quality_pairs` ({config.pairs} pairs, {config.response_words}-word responses, quality gap "
        f"1–{config.max_gap}), tiny GPT-2 ({config.n_layer} layers, {config.n_embd} dims), {config.epochs} epochs, "
        f"batch {config.batch_size}, lr {config.lr:g}, β {config.beta:g}; {config.val_fraction:.0%} of pairs held out. "
        "Bold: SymPO (symmetric losses). rDPO gets the true mean flip rate, cDPO max(rate, 0.1).",
    ]
    return "\n".join(lines) + "\n"


def mean_accuracy_at(results: pl.DataFrame, rate: float, losses: Sequence[str], kind: str = "symmetric") -> float:
    """Mean held-out clean accuracy over ``losses`` at noise ``rate`` of ``kind`` (all seeds)."""
    subset = results.filter((pl.col("kind") == kind) & (pl.col("rate") == rate) & pl.col("loss").is_in(list(losses)))
    return float(subset["clean_accuracy"].mean())


