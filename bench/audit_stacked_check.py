"""Check: audit's stacked fold models give the estimates the separate fits gave, on real data.

PandaLM dev (315 judge-labelled pairs, embed+mlp on the local all-MiniLM-L6-v2, 5 folds × 3 refits, seed 0):
the margins of the fold models trained as one stack now, against the margins of the separate fits cached in
bench/data/pandalm-dev-oof.csv (written by bench/audit_gold.py before the stack existed): their correlation,
and the judge-alone and 100-gold estimates of both, which should fall inside each other's intervals.

    PYTHONPATH=. .venv/bin/python bench/audit_stacked_check.py [--pandalm PATH]
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import audit_gold as G
import numpy as np
import polars as pl
from shared_data import REAL_DATA


def main() -> None:
    from prefnoise.noise_audit import auroc, estimate_noise_rate
    from prefnoise.noise_audit.gold import gold_estimate_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pandalm", default=str(REAL_DATA / "pandalm-dev.jsonl.gz"))
    args = parser.parse_args()
    frame = G.pandalm_pairs(Path(args.pandalm))
    print(f"PandaLM dev: {frame.height} pairs, the judge disagrees with the human majority on "
          f"{float(frame['label_wrong'].mean()):.3f}")
    started = time.perf_counter()
    stacked, _ = G.cross_fit(frame, types.SimpleNamespace(folds=5, refits=3))
    print(f"stacked cross-fit, 5 folds × 3 refits: {time.perf_counter() - started:.0f} s")
    cached = pl.read_csv(G.CACHE)
    if not (cached["idx"] == frame["idx"]).all():
        raise SystemExit(f"{G.CACHE} lists other pairs")
    separate = cached.select(pl.exclude("idx")).to_numpy().T
    print(f"correlation of the mean margins, separate vs stacked: "
          f"{np.corrcoef(separate.mean(0), stacked.mean(0))[0, 1]:.6f}")
    for name, margins in (("separate fits (cached)", separate), ("stacked", stacked)):
        single = estimate_noise_rate(margins, n_boot=200)
        gold = gold_estimate_of(frame.with_columns(pl.Series("oof_margin", margins.mean(0))), "gold")
        print(f"{name}: agreement with the judge {(margins.mean(0) > 0).mean():.3f}, AUROC "
              f"{auroc(-margins.mean(0), frame['label_wrong'].to_numpy()):.3f}; judge alone "
              f"{single.rate:.3f} [{single.low:.3f}, {single.high:.3f}]; 100 gold + models "
              f"{gold.rate:.3f} [{gold.low:.3f}, {gold.high:.3f}]")


if __name__ == "__main__":
    main()
