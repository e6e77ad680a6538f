"""Benchmark `prefnoise corrupt --engine ray` with 1 and 2 workers against the local engine, in one run.

Generates N pairs of ~1 KB of text (bench/corrupt.py's generator), then runs, interleaved for each round,
``prefnoise corrupt IN OUT --rate 0.2`` with the local engine, with ``--engine ray --workers 1`` and with
``--engine ray --workers 2``, each in its own subprocess through the real CLI (imports, Ray's start and
shutdown included); and ``--engine ray`` on a 10-row file, which is Ray's start-up cost alone. Then, in
this process with one local Ray of 2 CPUs started once, ``pn.corrupt`` with the local engine and with
``engine="ray"`` at 1 and 2 workers, interleaved: the steady-state cost without Ray's start-up. Prints each
run's seconds and the ratios to the local engine, and checks that every output equals the local one.

    .venv/bin/python bench/ray_engine.py --rows 200000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from corrupt import make_dataset

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "local": [],
    "ray-1": ["--engine", "ray", "--workers", "1"],
    "ray-2": ["--engine", "ray", "--workers", "2"],
}


def run_cli(source: Path, out: Path, flags: list[str]) -> float:
    """Wall seconds of one ``prefnoise corrupt`` subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "prefnoise", "corrupt", str(source), str(out), "--rate", "0.2", "--seed", "1",
               "--json", *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def same_table(a: Path, b: Path) -> bool:
    """Whether two corrupt outputs hold the same rows (their provenance clocks differ by design)."""
    return pq.read_table(a).replace_schema_metadata(None).equals(pq.read_table(b).replace_schema_metadata(None))


def in_process(source: Path, tmp: Path, rounds: int) -> dict[str, float]:
    """Median seconds of pn.corrupt per engine in this process, Ray (2 CPUs) started once beforehand."""
    sys.path.insert(0, str(ROOT))
    import prefnoise as pn  # the checkout this script belongs to
    from prefnoise.engine import ray_session
    from prefnoise.options import EngineOptions

    runs = {"local": {}, "ray-1": {"engine": "ray", "workers": 1}, "ray-2": {"engine": "ray", "workers": 2}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with ray_session(EngineOptions(engine="ray", workers=2)):
        pn.corrupt(source, tmp / "warm.parquet", rate=0.2, engine="ray")  # workers started, modules imported
        for round_ in range(rounds):
            for name, engine in runs.items():
                out = tmp / f"in-{name}-{round_}.parquet"
                start = time.perf_counter()
                pn.corrupt(source, out, rate=0.2, seed=1, **engine)
                times[name].append(time.perf_counter() - start)
                if name != "local":
                    assert same_table(tmp / f"in-local-{round_}.parquet", out), f"{name}: output differs"
                print(f"in one process, round {round_ + 1} {name:7s} {times[name][-1]:8.2f} s", flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min)")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        source, tiny = tmp / "pairs.parquet", tmp / "tiny.parquet"
        make_dataset(source, args.rows, with_ids=True)
        make_dataset(tiny, 10, with_ids=True)
        print(f"{args.rows:,} rows, {source.stat().st_size / 2**20:,.0f} MiB of zstd Parquet")
        times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "ray start-up"]}
        for round_ in range(args.rounds):
            for name, flags in VARIANTS.items():
                out = tmp / f"{name}-{round_}.parquet"
                times[name].append(run_cli(source, out, flags))
                if name != "local":
                    assert same_table(tmp / f"local-{round_}.parquet", out), f"{name}: output differs"
                print(f"round {round_ + 1} {name:7s} {times[name][-1]:8.2f} s", flush=True)
            times["ray start-up"].append(run_cli(tiny, tmp / f"tiny-{round_}.parquet", VARIANTS["ray-2"]))
            print(f"round {round_ + 1} ray start-up (10 rows) {times['ray start-up'][-1]:6.2f} s", flush=True)
        median = {name: statistics.median(values) for name, values in times.items()}
        for name in ("ray-1", "ray-2"):
            print(f"{name} / local time: {median[name] / median['local']:.2f}x "
                  f"(without start-up: {(median[name] - median['ray start-up']) / median['local']:.2f}x)")
        print(f"ray-2 / ray-1 time: {median['ray-2'] / median['ray-1']:.2f}x")
        steady = in_process(source, tmp, args.rounds)
        for name in ("ray-1", "ray-2"):
            print(f"in one process, Ray started once: {name} / local time: {steady[name] / steady['local']:.2f}x")
        print(f"in one process, Ray started once: ray-2 / ray-1 time: {steady['ray-2'] / steady['ray-1']:.2f}x")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
