"""Benchmark `prefnoise audit --annotators` on the PandaLM dev slice and on 100k generated pairs.

PandaLM (../shared/data/real/pandalm-dev.jsonl.gz): the table is oriented by the GPT-3.5 judge's
verdict (judge ties/garbage and empty or identical responses dropped: 338 pairs); annotators 1 and 2
are the other annotators; annotator 3 is kept out as a check. The judge's true disagreement rate is
measured against the 2-of-3 human majority (310 pairs with a strict majority) and against annotator 3
alone (pairs where annotator 3 did not tie). Baseline: the judge's disagreement with annotators 1 and 2
counted directly (pairs where both agree with each other and neither ties).

Speed: an annotator-only audit of 100,000 generated pairs (two humans, a position-biased judge,
200 bootstrap refits), against crowd-kit's DawidSkene fitted once on the same votes when installed.

    .venv/bin/python bench/audit_annotators.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prefnoise as pn  # noqa: E402
from tests.test_audit_annotators import BIASED_JUDGE, HUMAN_A, HUMAN_B, pandalm_table, simulate  # noqa: E402


def pandalm(bootstrap: int) -> None:
    from sklearn.metrics import roc_auc_score

    table, majority, judge = pandalm_table()
    third = table["annotator3"].to_numpy()
    decided, third_decided = majority > 0, third != "tie"
    wrong_majority, wrong_third = majority != judge, third == "rejected"
    humans = table.select("annotator1", "annotator2").to_numpy()
    agree = (humans[:, 0] == humans[:, 1]) & (humans[:, 0] != "tie")
    print(f"PandaLM dev: {table.height} pairs; judge wrong vs the 2-of-3 majority {wrong_majority[decided].mean():.3f} "
          f"({wrong_majority[decided].sum()}/{decided.sum()}), vs annotator 3 {wrong_third[third_decided].mean():.3f} "
          f"({wrong_third[third_decided].sum()}/{third_decided.sum()})")
    print(f"  baseline (annotators 1 and 2 agree, count the judge's disagreements): "
          f"{(humans[agree, 0] == 'rejected').mean():.3f} on {agree.sum()} pairs, no interval")
    for position in ("shown_first", None):
        started = time.perf_counter()
        result = pn.audit(table, annotators=["annotator1", "annotator2"], position_col=position, by="longer",
                          bootstrap=bootstrap, seed=0)
        elapsed = time.perf_counter() - started
        rate = result.summary["noise_rate"]
        suspicion = result.table["suspicion"].to_numpy()
        print(f"  {rate['frame']} frame: {rate['rate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] "
              f"in {elapsed:.2f} s; "
              f"AUROC vs majority {roc_auc_score(wrong_majority[decided], suspicion[decided]):.3f}, "
              f"vs annotator 3 {roc_auc_score(wrong_third[third_decided], suspicion[third_decided]):.3f}")
        for row in result.summary["annotators"]:
            bias = row["position_bias"]
            bias_text = "" if bias is None else (
                f", position bias {bias['rate']:+.3f} [{bias['low']:+.3f}, {bias['high']:+.3f}]"
            )
            flip = row["flip_rate"]
            print(f"    {row['annotator']}: flip {flip['rate']:.3f} [{flip['low']:.3f}, {flip['high']:.3f}], "
                  f"ties {row['tie_rate']:.3f}{bias_text}")
        for breakdown in result.summary["breakdowns"]:
            parts = [f"{breakdown[s]['group']}: {breakdown[s]['rate']:.3f} [{breakdown[s]['low']:.3f}, "
                     f"{breakdown[s]['high']:.3f}] (~{breakdown[s]['pairs']:.0f})" for s in ("positive", "negative")]
            print(f"    by {breakdown['rule']}: " + "; ".join(parts))


def speed(pairs: int, bootstrap: int) -> None:
    frame, wrong = simulate(pairs, BIASED_JUDGE, [HUMAN_A, HUMAN_B], seed=2)
    started = time.perf_counter()
    result = pn.audit(frame, annotators=["h0", "h1"], position_col="shown_first", bootstrap=bootstrap, seed=0)
    elapsed = time.perf_counter() - started
    rate = result.summary["noise_rate"]
    print(f"{pairs:,} generated pairs, {bootstrap} bootstrap refits: {elapsed:.2f} s; rate {rate['rate']:.4f} "
          f"[{rate['low']:.4f}, {rate['high']:.4f}], true {wrong.mean():.4f}")
    try:
        import pandas as pd
        from crowdkit.aggregation import DawidSkene
    except ImportError:
        print("crowd-kit not installed: no baseline")
        return
    from prefnoise.noise_audit import dawid_skene as D
    from prefnoise.noise_audit import votes as V

    chosen_first = V.position_codes(frame["shown_first"], "shown_first")
    codes = np.column_stack([np.full(pairs, V.CHOSEN), V.annotator_columns(frame, ["h0", "h1"])])
    votes = D.to_frame(codes, chosen_first)
    long = pd.DataFrame({"task": np.repeat(np.arange(pairs), 3), "worker": np.tile(np.arange(3), pairs),
                         "label": votes.reshape(-1)})
    long = long[long["label"] != V.MISSING]
    started = time.perf_counter()
    DawidSkene(n_iter=100).fit(long)
    baseline = time.perf_counter() - started
    print(f"crowd-kit DawidSkene, one fit (no bootstrap): {baseline:.2f} s; prefnoise with {bootstrap} refits "
          f"takes {elapsed / baseline:.2f}x its time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=100_000)
    args = parser.parse_args()
    pandalm(args.bootstrap)
    speed(args.pairs, 200)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")  # crowd-kit 1.4.2 uses pandas keywords that pandas 3 deprecates
    main()
