"""Benchmark `prefnoise rank-check` against a scipy.stats.kendalltau + pandas version of the report.

    .venv/bin/python bench/rank_check.py            # 10M pairs (the issue's scale target: < 60 s)
    .venv/bin/python bench/rank_check.py --rows 1000000

Generates N pairs (2 responses each, N/2 prompts, 20% flipped) with a true score and a noisy learned
reward, writes Parquet, then times in the same run: (1) `prefnoise.rank.rank_report` on a lazy scan
(overall + split by `flipped`, 1000 bootstrap resamples); (2) a baseline: pandas for agreement and
ties, scipy.stats.kendalltau / spearmanr over all responses (overall and per flipped value), a pandas
groupby for per-prompt preservation, and a naive bootstrap (numpy resampling, 200 replicates, timed
and scaled to 1000). The baseline's per-prompt tau via groupby-apply is timed on 20k prompts and
extrapolated (it would take hours at 10M). Prints seconds, the ratio and peak RSS of each, the
CPU seconds of the prefnoise part and the load average (the machine is shared, so wall times vary).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def make_pairs(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(n, 2))
    reward = score + 0.5 * rng.normal(size=(n, 2))
    ids = np.arange(n)
    return pl.DataFrame(
        {
            "prompt": pl.Series(ids // 2).cast(pl.String),
            "chosen": pl.Series(ids * 2).cast(pl.String),
            "rejected": pl.Series(ids * 2 + 1).cast(pl.String),
            "chosen_score": score[:, 0],
            "rejected_score": score[:, 1],
            "chosen_reward": reward[:, 0],
            "rejected_reward": reward[:, 1],
            "flipped": rng.random(n) < 0.2,
        }
    )


def prefnoise_report(path: Path) -> dict:
    from prefnoise.rank import rank_report

    report = rank_report(pl.scan_parquet(path), n_boot=1000)
    m = report.overall
    return {"agreement": m.agreement.value, "tau": m.kendall_tau_b, "rho": m.spearman_rho}


def baseline_report(path: Path) -> dict:
    import pandas as pd
    from scipy import stats

    df = pd.read_parquet(path)
    pm = df.chosen_reward - df.rejected_reward
    tm = df.chosen_score - df.rejected_score
    outcome = np.where(pm == 0, 0.5, (np.sign(pm) == np.sign(tm)).astype(float))[tm != 0]
    agreement = outcome.mean()
    reps = 200
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    boots = [outcome[rng.integers(0, len(outcome), len(outcome))].mean() for _ in range(reps)]
    boot_extra = (time.perf_counter() - start) * (1000 / reps - 1)
    np.percentile(boots, [2.5, 97.5])
    responses = pd.DataFrame(
        {
            "prompt": np.concatenate([df.prompt, df.prompt]),
            "true": np.concatenate([df.chosen_score, df.rejected_score]),
            "pred": np.concatenate([df.chosen_reward, df.rejected_reward]),
            "flipped": np.concatenate([df.flipped, df.flipped]),
        }
    )
    tau = stats.kendalltau(responses.true, responses.pred).statistic
    rho = stats.spearmanr(responses.true, responses.pred).statistic
    for _, part in responses.groupby("flipped"):
        stats.kendalltau(part.true, part.pred)
        stats.spearmanr(part.true, part.pred)
    ok = (pm * np.sign(tm) > 0).groupby(df.prompt).all().mean()  # preservation (1 pair per prompt)
    sample = responses[responses.prompt.isin(responses.prompt.unique()[:20_000])]
    start = time.perf_counter()
    sample.groupby("prompt").apply(lambda g: stats.kendalltau(g.true, g.pred).statistic, include_groups=False)
    per_prompt = time.perf_counter() - start
    per_prompt_extra = per_prompt * (responses.prompt.nunique() / 20_000 - 1)
    return {
        "agreement": agreement,
        "tau": tau,
        "rho": rho,
        "preservation": ok,
        "extrapolated_s": boot_extra + per_prompt_extra,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        make_pairs(args.rows).write_parquet(path)
        print(f"{args.rows:,} pairs written; peak RSS after generation {peak_rss_gib():.2f} GiB")
        print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        start, cpu = time.perf_counter(), cpu_seconds()
        ours = prefnoise_report(path)
        ours_s, ours_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        rss = peak_rss_gib()
        print(f"prefnoise rank_report: {ours_s:.1f} s ({ours_cpu:.1f} CPU s), peak RSS {rss:.2f} GiB, {ours}")
        print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        start = time.perf_counter()
        base = baseline_report(path)
        measured = time.perf_counter() - start
        base_s = measured + base.pop("extrapolated_s")
        print(f"scipy+pandas baseline measured part: {measured:.1f} s")
        rss = peak_rss_gib()
        print(f"scipy+pandas baseline: {base_s:.1f} s (incl. extrapolated parts), peak RSS {rss:.2f} GiB, {base}")
        print(f"ratio baseline / prefnoise: {base_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
