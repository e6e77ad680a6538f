"""A/B timing of `prefnoise corrupt` against the polars copy, for two checkouts on one dataset.

Generates bench/corrupt.py's dataset once (with and without pair_id) and runs its ``--run`` variants,
each in its own subprocess, interleaved (copy, A, B, A without ids, B without ids) for ``--rounds``
rounds; ``PYTHONPATH`` picks the checkout. On a shared machine interleaving keeps load drift from
favouring one side. Prints one JSON line per run: wall and CPU seconds (user + system, every thread),
peak RSS, and the 1-minute load average before and after.

    .venv/bin/python bench/corrupt_ab.py --rows 2000000 --a . --b ../main --data /tmp/bench-ab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from corrupt import make_dataset

BENCH = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--a", required=True, help="checkout (or copy of the package) A")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--data", type=Path, required=True, help="directory for the dataset (reused)")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    ids, noid = args.data / f"pairs-{args.rows}.parquet", args.data / f"pairs-noid-{args.rows}.parquet"
    if not (ids.exists() and noid.exists()):
        start = time.time()
        make_dataset(ids, args.rows, with_ids=True)
        make_dataset(noid, args.rows, with_ids=False)
        print(f"generated in {time.time() - start:.0f} s, {ids.stat().st_size / 2**20:.0f} MiB", flush=True)
    trees = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve())}
    plan = [("copy", "a"), ("prefnoise", "a"), ("prefnoise", "b"), ("prefnoise-noid", "a"), ("prefnoise-noid", "b")]
    for round_ in range(args.rounds):
        for variant, tree in plan:
            out = args.data / f"out-{variant}-{tree}.parquet"
            out.unlink(missing_ok=True)
            load = os.getloadavg()[0]
            proc = subprocess.run(
                [sys.executable, str(BENCH / "corrupt.py"), "--run", variant, "--source",
                 str(noid if variant == "prefnoise-noid" else ids), "--out", str(out)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": trees[tree]}, check=True,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            record = {"round": round_, "variant": variant, "tree": tree, "seconds": round(result["seconds"], 2),
                      "cpu_seconds": round(result["cpu_seconds"], 2),
                      "peak_rss_mb": round(result["peak_rss_mb"]), "load1_before": round(load, 1),
                      "load1_after": round(os.getloadavg()[0], 1)}
            print(json.dumps(record), flush=True)
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
