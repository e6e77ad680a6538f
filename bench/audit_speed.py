"""Benchmark: `prefnoise audit` (5 folds × 3 refits of fold models) against one `prefnoise fit-reward` on the
same pairs and settings, as whole processes, interleaved (fit, audit, fit, audit, ...) so that the
machine's load falls on both alike; prints each pair of timings, their ratio and the median ratio.

Two cases:
- ``1k``: the real ultrafeedback-binarized-trl-train1000 slice (994 pairs after --drop-invalid) through
  ``embed+mlp`` on a local MiniLM encoder, the embeddings already cached (one untimed warm-up audit
  fills the cache first);
- ``10k``: SYNTHETIC 384-dimensional feature vectors standing in for cached embeddings (10,000 generated
  pairs, linear true reward, 20% symmetric flips) through the ``mlp`` backend (the same MLP that
  embed+mlp trains on its embeddings; there is no 10k-pair real slice here).

    PYTHONPATH=. .venv/bin/python bench/audit_speed.py --encoder PATH [--cases 1k,10k] [--repeats 3] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import ULTRAFEEDBACK_TRAIN


def synthetic_table(directory: Path, pairs: int) -> Path:
    """A generated table of ``pairs`` pairs with 384-d feature vectors and 20% symmetric flips."""
    from prefnoise.data import canonicalize, write_table
    from prefnoise.experiments.features import linear_feature_pairs
    from prefnoise.noise import NoiseSpec, corrupt_frame

    clean = canonicalize(linear_feature_pairs(pairs, 384, seed=0))[0]
    noisy, _ = corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.2, seed=1))
    path = directory / f"synthetic-{pairs}.parquet"
    write_table(noisy, path)
    return path


def timed(command: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``command`` (a failure stops the benchmark with its stderr).
    On a shared machine the CPU seconds move less with the load than the wall time. ``cwd``: where it runs
    (``python -m`` imports the package of its working directory first, whatever PYTHONPATH says)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 4):  # 4: the flip rate undetermined (audit still ran every fold model)
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def run_case(name: str, tag: str, data: Path, model: list[str], repeats: int, work: Path, env: dict[str, str],
             *, warm_up: bool, before: str | None = None) -> None:
    prefnoise = [sys.executable, "-m", "prefnoise", "-q"]
    fit = [*prefnoise, "fit-reward", str(data), *model, "--out", str(work / f"fit-{tag}"), "--overwrite"]
    audit = [*prefnoise, "audit", str(data), *model, "--json"]
    print(f"## {name}: {data.name}", flush=True)
    print("  fit-reward: " + " ".join(fit[3:]), flush=True)
    print("  audit:      " + " ".join(audit[3:]), flush=True)
    if warm_up:
        timed(audit, env)  # fills the embedding cache (embed+mlp), untimed
    ratios, cpu_ratios, old = [], [], []
    for repeat in range(repeats):
        one_fit, fit_cpu = timed(fit, env)
        full, full_cpu = timed(audit, env)
        ratios.append(full / one_fit)
        cpu_ratios.append(full_cpu / fit_cpu)
        line = (f"  run {repeat + 1}: fit-reward {one_fit:.1f} s ({fit_cpu:.1f} s CPU), audit {full:.1f} s "
                f"({full_cpu:.1f} s CPU), ratio {ratios[-1]:.2f} wall, {cpu_ratios[-1]:.2f} CPU")
        if before is not None:  # the same audit by the code in ``before`` (one fit per fold model)
            earlier, earlier_cpu = timed(audit, {**env, "PYTHONPATH": before}, cwd=before)
            old.append((earlier / one_fit, earlier_cpu / fit_cpu))
            line += f"; audit of {before}: {earlier:.1f} s ({earlier_cpu:.1f} s CPU), ratio {old[-1][0]:.2f} wall, " \
                    f"{old[-1][1]:.2f} CPU"
        print(line, flush=True)
    print(f"  median ratio audit / fit-reward: {statistics.median(ratios):.2f} wall, "
          f"{statistics.median(cpu_ratios):.2f} CPU" + (
              f" (the code in {before}: {statistics.median(o[0] for o in old):.2f} wall, "
              f"{statistics.median(o[1] for o in old):.2f} CPU)" if old else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help="local MiniLM directory (the 1k case)")
    parser.add_argument("--cases", default="1k,10k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs of the synthetic case")
    parser.add_argument("--cache-dir", help="an embedding cache to use (default: a fresh one, filled first)")
    parser.add_argument("--uf", default=str(ULTRAFEEDBACK_TRAIN), help="the UltraFeedback slice of the 1k case")
    parser.add_argument("--before", help="a checkout whose audit to time too (its PYTHONPATH), e.g. main's")
    parser.add_argument("--epochs", type=int, help="epochs of both commands (default: the backends' 50)")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="audit-speed-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PREFNOISE_CACHE_DIR": args.cache_dir or str(work / "cache")}
        cases = args.cases.split(",")
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        if "1k" in cases:
            if args.encoder is None:
                sys.exit("the 1k case needs --encoder PATH (a local MiniLM directory)")
            model = ["--drop-invalid", "--model", "embed+mlp", "--encoder", args.encoder, *epochs]
            run_case("1k real UltraFeedback, embed+mlp (embeddings cached)", "1k", Path(args.uf).resolve(), model,
                     args.repeats, work, env, warm_up=args.cache_dir is None, before=args.before)
        if "10k" in cases:
            data = synthetic_table(work, args.pairs)
            run_case(f"{args.pairs // 1000}k SYNTHETIC 384-d features, mlp", "10k", data, ["--model", "mlp", *epochs],
                     args.repeats, work, env, warm_up=False, before=args.before)
    print(f"load after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
