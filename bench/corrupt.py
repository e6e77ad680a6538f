"""Benchmark `prefnoise corrupt` against the I/O floor and a datasets.map implementation.

Generates N pairs of ~1 KB of text each (default 2,000,000, about 2 GB of text), writes them as
Parquet (``--data DIR`` keeps and reuses them), then runs each variant in its own subprocess and reports
seconds, CPU seconds (user + system, every thread), rows/s and peak RSS:

- ``copy``: polars ``scan_parquet -> sink_parquet`` of the same file (the I/O floor);
- ``prefnoise``: ``prefnoise corrupt IN OUT --rate 0.2`` (the real CLI, streaming);
- ``prefnoise-noid``: the same on a file without ``pair_id``, so ids are hashed from content too;
- ``datasets-map``: the obvious ``datasets.Dataset.map`` a user would write (random flips).

With ``--rounds K`` the variants run interleaved (copy, prefnoise, prefnoise-noid, ...) K times and both
ratios to the copy of the same round are printed per round and as median [min, max], by wall time and by
CPU time, with the 1-minute load average; on a shared machine the CPU ratio is the steadier view.

    .venv/bin/python bench/corrupt.py --rows 2000000 --skip-datasets --rounds 3 --data /tmp/bench-corrupt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from measure import cpu_seconds, peak_rss_mib

WORDS = np.array(
    "the a of to and in is it that for on with as was be by this are or his from at which but have an they you "
    "were her she there been one all we their has would when if more no out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should".split()
)


def make_dataset(path: Path, rows: int, *, with_ids: bool, seed: int = 0) -> None:
    """Write ``rows`` pairs with ~1 KB of pseudo-text per row, in 64k-row groups."""
    rng = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".partial")  # renamed once complete: a killed run leaves nothing to reuse
    writer = None
    chunk = 65_536
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        words = WORDS[rng.integers(0, len(WORDS), size=(n, 3, 60))]
        texts = [" ".join(row) for row in words.reshape(n * 3, 60)]
        data = {
            "prompt": texts[0::3],
            "chosen": [t[:450] for t in texts[1::3]],
            "rejected": [t[:450] for t in texts[2::3]],
            "chosen_score": rng.normal(size=n),
            "rejected_score": rng.normal(size=n),
        }
        if with_ids:
            data = {"pair_id": [f"{i:016x}" for i in range(start, start + n)], **data}
        table = pa.table(data)
        if writer is None:
            writer = pq.ParquetWriter(partial, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()
    partial.replace(path)


def run_variant(variant: str, source: Path, out: Path) -> None:
    """Run one variant in this process and print its seconds and peak RSS as JSON."""
    start = time.perf_counter()
    if variant == "copy":
        pl.scan_parquet(source).sink_parquet(out, compression="zstd")
    elif variant in ("prefnoise", "prefnoise-noid"):
        from prefnoise.cli import app

        try:
            code = app(["corrupt", str(source), str(out), "--rate", "0.2", "--seed", "1", "--json"],
                       standalone_mode=False)
        except SystemExit as stop:
            code = stop.code
        if code:  # a failed run must not be timed as a fast one
            raise SystemExit(f"prefnoise corrupt {source} exited {code}")
    elif variant == "datasets-map":
        import random

        import datasets

        datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_parquet(str(source), cache_dir=str(out.parent / "hf-cache"))
        rng = random.Random(1)

        def flip(row):
            if rng.random() < 0.2:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
                row["chosen_score"], row["rejected_score"] = row["rejected_score"], row["chosen_score"]
                row["flipped"] = True
            else:
                row["flipped"] = False
            return row

        dataset.map(flip).to_parquet(str(out))
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mib()
    print(json.dumps({"variant": variant, "seconds": seconds, "cpu_seconds": cpu_seconds(), "peak_rss_mb": peak_mb}))


def measure(variant: str, source: Path, out: Path) -> dict:
    """Run a variant in a fresh subprocess (so peak RSS is its own)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--run", variant, "--source", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--skip-datasets", action="store_true", help="skip the slow datasets.map baseline")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--data", type=Path, help="directory to keep (and reuse) the generated files in")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_variant(args.run, Path(args.source), Path(args.out))
        return
    with tempfile.TemporaryDirectory(prefix="bench-corrupt-") as tmp:
        data = args.data or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        with_ids, without_ids = data / f"pairs-{args.rows}.parquet", data / f"pairs-noid-{args.rows}.parquet"
        for path, ids in ((with_ids, True), (without_ids, False)):
            if not path.exists():
                make_dataset(path, args.rows, with_ids=ids)
        size_mb = with_ids.stat().st_size / 2**20
        print(f"{args.rows:,} rows, {size_mb:,.0f} MiB of zstd Parquet")
        variants = ["copy", "prefnoise", "prefnoise-noid"] + ([] if args.skip_datasets else ["datasets-map"])
        rounds = [run_round(variants, with_ids, without_ids, Path(tmp), args.rows) for _ in range(args.rounds)]
        report(rounds)


def run_round(variants: list[str], with_ids: Path, without_ids: Path, tmp: Path, rows: int) -> dict[str, dict]:
    """Every variant once, in order; print a line each (with the load average before it)."""
    results = {}
    for variant in variants:
        source = without_ids if variant == "prefnoise-noid" else with_ids
        load = os.getloadavg()[0]
        results[variant] = r = measure(variant, source, tmp / f"out-{variant}.parquet")
        (tmp / f"out-{variant}.parquet").unlink(missing_ok=True)
        print(f"{variant:15s} {r['seconds']:8.2f} s  cpu {r['cpu_seconds']:8.2f} s  "
              f"{rows / r['seconds']:12,.0f} rows/s  peak RSS {r['peak_rss_mb']:7,.0f} MiB  load {load:.1f}",
              flush=True)
    for name, key in (("time", "seconds"), ("cpu", "cpu_seconds")):
        ratios = [f"{v} / copy {name}: {results[v][key] / results['copy'][key]:.2f}x"
                  for v in ("prefnoise", "prefnoise-noid")]
        print("  " + "; ".join(ratios), flush=True)
    return results


def report(rounds: list[dict[str, dict]]) -> None:
    """Both ratios to the same round's copy, by wall and CPU time: median [min, max] over the rounds."""
    goals = {"prefnoise": 1.3, "prefnoise-noid": 1.5}
    for variant, goal in goals.items():
        for name, key in (("time", "seconds"), ("cpu", "cpu_seconds")):
            ratios = [r[variant][key] / r["copy"][key] for r in rounds]
            print(f"{variant} / copy {name}: median {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} round(s) (goal <= {goal}x)")
    if "datasets-map" in rounds[-1]:
        ratio = rounds[-1]["datasets-map"]["seconds"] / rounds[-1]["prefnoise"]["seconds"]
        print(f"datasets.map / prefnoise time: {ratio:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
