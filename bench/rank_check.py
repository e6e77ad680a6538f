"""Benchmark `prefnoise rank-check` against a scipy.stats.kendalltau + pandas version of the report.

    .venv/bin/python bench/rank_check.py            # 10M pairs (the issue's scale target: < 60 s)
    .venv/bin/python bench/rank_check.py --rows 1000000
    .venv/bin/python bench/rank_check.py --rows 20000000 --skip-baseline   # memory: flat in N?
    .venv/bin/python bench/rank_check.py --long --rows 20000000            # 19 discrete true scores
    .venv/bin/python bench/rank_check.py --anchor-only                       # per-prompt Spearman vs polars

Generates N pairs (2 responses each, N/2 prompts, 20% flipped) with a true score and a noisy learned
reward, writes Parquet, then times in the same run: (1) `prefnoise.metrics.rank_report` on a lazy scan
(overall + split by `flipped`, 1000 bootstrap resamples); (2) a baseline: pandas for agreement and
ties, scipy.stats.kendalltau / spearmanr over all responses (overall and per flipped value), a pandas
groupby for per-prompt preservation, and a naive bootstrap (numpy resampling, 200 replicates, timed
and scaled to 1000). The baseline's per-prompt tau via groupby-apply is timed on 20k prompts and
extrapolated (it would take hours at 10M). Each implementation runs in its own child process, so its
peak RSS is its own (not the generator's). Prints seconds, the ratio and peak RSS of each, the CPU
seconds and the load average (the machine is shared, so wall times vary). `--memory-responses` is
rank_report's budget (responses held at once; the rest spill to temporary files).

The polars anchor (issue 15): per-prompt Spearman's rho, prefnoise's kernel against polars' native
grouped rank correlation (`group_by("prompt").agg(pl.corr("x", "y", method="spearman"))`) on the same
responses (2 per pair, integer prompt ids, in memory, built before the clocks start). Timed in one
child process: (a) the per-prompt pass rank-check runs (`orders` + `grouped_stats`: Spearman's rho
AND Kendall's tau-b pair counts per prompt); (b) the public `rank_stats` with (split, prompt) keys;
(c) polars in memory; (d) polars from the Parquet file (unpivot + group_by), to set beside the whole
`rank_report` time. The values of (a), (b) and (c) must agree to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from measure import cpu_seconds, peak_rss_mib


def make_long(n: int, seed: int = 0) -> pl.DataFrame:
    """UltraFeedback-shaped long table: n responses, 4 per prompt, a discrete true score (1 to 10 in
    steps of 0.5, so 19 values each held by ~n/19 responses) and a continuous learned reward."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=n)
    score = np.clip(np.round((quality * 1.5 + 5.5) * 2) / 2, 1.0, 10.0)
    return pl.DataFrame({"prompt_id": np.arange(n) // 4, "score": score, "reward": quality + 0.5 * rng.normal(size=n)})


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


def prefnoise_report(path: Path, memory_responses: int) -> dict:
    from prefnoise.metrics import rank_report

    report = rank_report(pl.scan_parquet(path), n_boot=1000, memory_responses=memory_responses)
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
        "agreement": float(agreement),
        "tau": float(tau),
        "rho": float(rho),
        "preservation": float(ok),
        "extrapolated_s": boot_extra + per_prompt_extra,
    }


def long_responses(path: Path) -> pl.DataFrame:
    """The pair table's responses, 2 per pair: integer prompt ids, true score x, learned reward y."""
    lazy = pl.scan_parquet(path)
    sides = [
        lazy.select(
            pl.col("prompt").cast(pl.Int64), pl.col(f"{side}_score").alias("x"), pl.col(f"{side}_reward").alias("y")
        )
        for side in ("chosen", "rejected")
    ]
    return pl.concat(sides).collect()


def polars_spearman(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Per-prompt Spearman's rho by polars' native grouped rank correlation, sorted by prompt."""
    return (
        frame.lazy()
        .group_by("prompt")
        .agg(pl.corr("x", "y", method="spearman").alias("rho"))
        .sort("prompt")
        .collect()
    )


def anchor_report(path: Path) -> dict:
    """Per-prompt Spearman: prefnoise's kernels against polars on the same in-memory responses."""
    from prefnoise.metrics.rankstats import grouped_stats, orders, rank_stats

    long = long_responses(path)
    prompt, x, y = long["prompt"].to_numpy(), long["x"].to_numpy(), long["y"].to_numpy()
    split = np.zeros(len(prompt), dtype=np.int64)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, work):
        start, used = time.perf_counter(), time.process_time()
        value = work()
        seconds[name], cpu[name] = time.perf_counter() - start, time.process_time() - used
        return value

    def kernel_pass() -> dict:  # rank-check's per-prompt pass: dense prompt codes, both orders, grouped stats
        code = np.unique(prompt, return_inverse=True)[1].reshape(-1).astype(np.int64)
        return grouped_stats(orders(x, y), code)

    def from_parquet() -> pl.DataFrame:
        lazy = pl.scan_parquet(path)
        sides = [lazy.select("prompt", x=f"{s}_score", y=f"{s}_reward") for s in ("chosen", "rejected")]
        return polars_spearman(pl.concat(sides))

    kernel = timed("prefnoise_kernel", kernel_pass)
    public = timed("prefnoise_rank_stats", lambda: rank_stats((split, prompt), x, y))
    native = timed("polars", lambda: polars_spearman(long))
    timed("polars_from_parquet", from_parquet)
    rho = native["rho"].to_numpy()
    differences = [np.abs(kernel["rho"] - rho), np.abs(public["rho"] - rho)]
    nan_match = all(np.array_equal(np.isnan(d), np.isnan(rho)) for d in differences)
    return {
        "prompts": len(rho),
        "responses": len(prompt),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "max_abs_difference": float(max(np.nanmax(d, initial=0.0) for d in differences)),
        "nan_positions_agree": nan_match,
        "mean_rho": float(np.nanmean(rho)),
    }


def measure(which: str, path: Path, memory_responses: int) -> None:
    """Child process: run one implementation and print its time, CPU time, peak RSS and results."""
    start, cpu = time.perf_counter(), cpu_seconds()
    if which == "anchor":
        result = anchor_report(path)
        print(json.dumps({"wall_s": time.perf_counter() - start, "rss_gib": peak_rss_mib() / 1024, "result": result}))
        return
    result = prefnoise_report(path, memory_responses) if which == "prefnoise" else baseline_report(path)
    extra = result.pop("extrapolated_s", 0.0)
    wall = time.perf_counter() - start
    print(
        json.dumps(
            {
                "wall_s": wall,
                "total_s": wall + extra,
                "cpu_s": cpu_seconds() - cpu,
                "rss_gib": peak_rss_mib() / 1024,
                "result": result,
            }
        )
    )


def run_child(which: str, path: Path, memory_responses: int) -> dict:
    args = [
        sys.executable,
        __file__,
        "--measure",
        which,
        "--data",
        str(path),
        "--memory-responses",
        str(memory_responses),
    ]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from prefnoise.metrics import DEFAULT_MEMORY_RESPONSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument(
        "--long", action="store_true", help="an UltraFeedback-shaped long table of --rows responses (no baseline)"
    )
    parser.add_argument("--memory-responses", type=int, default=DEFAULT_MEMORY_RESPONSES)
    parser.add_argument("--skip-baseline", action="store_true", help="time prefnoise only (e.g. for memory scaling)")
    parser.add_argument("--data", type=Path, help="use this Parquet file instead of generating one")
    parser.add_argument("--skip-anchor", action="store_true", help="skip the per-prompt Spearman anchor (polars)")
    parser.add_argument("--anchor-only", action="store_true", help="time only the per-prompt Spearman anchor")
    parser.add_argument("--measure", choices=["prefnoise", "baseline", "anchor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.data, args.memory_responses)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data or Path(tmp) / "pairs.parquet"
        if args.data is None:
            (make_long if args.long else make_pairs)(args.rows).write_parquet(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        shape = "responses (long table)" if args.long else "pairs"
        print(f"{rows:,} {shape}; --memory-responses {args.memory_responses:,}")
        print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        if not (args.skip_anchor or args.long):
            print_anchor(run_child("anchor", path, args.memory_responses))
        if args.anchor_only:
            return
        ours = run_child("prefnoise", path, args.memory_responses)
        print(
            f"prefnoise rank_report: {ours['wall_s']:.1f} s ({ours['cpu_s']:.1f} CPU s), "
            f"peak RSS {ours['rss_gib']:.2f} GiB, {ours['result']}"
        )
        print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        if args.skip_baseline or args.long:
            return
        base = run_child("baseline", path, args.memory_responses)
        print(f"scipy+pandas baseline measured part: {base['wall_s']:.1f} s")
        print(
            f"scipy+pandas baseline: {base['total_s']:.1f} s (incl. extrapolated parts), "
            f"peak RSS {base['rss_gib']:.2f} GiB, {base['result']}"
        )
        print(f"ratio baseline / prefnoise: {base['total_s'] / ours['wall_s']:.2f}x")


def print_anchor(anchor: dict) -> None:
    """The anchor's times, the ratios prefnoise / polars and whether the values agree."""
    result, seconds = anchor["result"], anchor["result"]["seconds"]
    print(
        f"per-prompt Spearman anchor: {result['responses']:,} responses, {result['prompts']:,} prompts, "
        f"peak RSS {anchor['rss_gib']:.2f} GiB"
    )
    for name in ("prefnoise_kernel", "prefnoise_rank_stats", "polars", "polars_from_parquet"):
        print(f"  {name}: {seconds[name]:.2f} s ({result['cpu_seconds'][name]:.2f} CPU s)")
    print(f"  ratio prefnoise kernel / polars: {seconds['prefnoise_kernel'] / seconds['polars']:.2f}x")
    print(f"  ratio prefnoise rank_stats / polars: {seconds['prefnoise_rank_stats'] / seconds['polars']:.2f}x")
    print(
        f"  values: max |rho difference| {result['max_abs_difference']:.2e}, "
        f"NaN prompts agree: {result['nan_positions_agree']}, mean rho {result['mean_rho']:.6f}"
    )
    if not (result["max_abs_difference"] <= 1e-9 and result["nan_positions_agree"]):
        raise SystemExit("per-prompt Spearman: prefnoise and polars disagree")


if __name__ == "__main__":
    main()
