"""Transformer reward-model training speed: `prefnoise fit-reward` vs TRL's RewardTrainer.

Same tiny GPT-2 (built from a config, BPE tokenizer trained on the fly), same pairs, batch size,
learning rate, epochs, thread count and device, in the same run. Both train with the logistic
(Bradley–Terry) loss, TRL's only loss. Reports training-loop steps/s and pairs/s (TRL's own
train_runtime; prefnoise from its first to its last optimiser step) and end-to-end seconds
(model load, tokenisation, training), then the ratio prefnoise / TRL.

TRL lives only in a separate benchmark venv (never in .venv, whose torch must not change):

    python3 -m venv /tmp/benchenv
    /tmp/benchenv/bin/pip install "torch==2.13.0" trl      # torch==2.13.0 resolves to the local CPU wheel
    .venv/bin/python bench/fit_reward.py [--pairs 512] [--batch-size 8] [--threads 2] [--repeats 2]

The TRL side runs as `/tmp/benchenv/bin/python bench/fit_reward.py --trl-worker ...` (the
`--trl-python` flag points elsewhere); that mode imports only torch/transformers/datasets/trl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-4
MAX_LENGTH = 128  # every pair fits: TRL filters longer pairs where prefnoise truncates


def make_pairs(n: int) -> list[dict[str, str]]:
    """Short synthetic text pairs (the same for both trainers)."""
    import random

    rng = random.Random(0)
    words = "the a model answer helpful harmless kind clear wrong rude short long very not".split()
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        rows.append(
            {
                "prompt": f"Question {i}: {body}?",
                "chosen": f" A good answer: {body}.",
                "rejected": f" A bad answer: {' '.join(reversed(body.split()))}!",
            }
        )
    return rows


def trl_worker(model: str, data: str, batch_size: int, threads: int, out: str) -> None:
    """Train with TRL's RewardTrainer and write its timings as JSON to ``out``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(threads)
    started = time.perf_counter()
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=1, dtype=torch.float32, trust_remote_code=False
    )
    net.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=LR,
            max_length=MAX_LENGTH,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(model=net, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        kept = len(trainer.train_dataset)
        metrics = trainer.train().metrics
    total = time.perf_counter() - started
    steps = -(-kept // batch_size)
    Path(out).write_text(
        json.dumps(
            {
                "pairs": kept,
                "steps": steps,
                "loop_s": metrics["train_runtime"],
                "total_s": total,
            }
        )
    )


def prefnoise_run(model: Path, rows: list[dict[str, str]], batch_size: int, threads: int) -> dict:
    """Train with prefnoise's transformer backend; return its timings."""
    import polars as pl
    import torch

    from prefnoise.data import content_pair_ids
    from prefnoise.reward import fit_reward_model

    torch.set_num_threads(threads)
    frame = pl.DataFrame(rows)
    frame = frame.with_columns(
        pl.Series("pair_id", content_pair_ids(frame["prompt"], frame["chosen"], frame["rejected"]))
    )
    marks: dict[str, float] = {}

    def on_progress(n: int) -> None:
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()

    started = time.perf_counter()
    fit_reward_model(
        frame,
        backend="transformer",
        model_path=model,
        loss="logistic",
        epochs=1,
        batch_size=batch_size,
        lr=LR,
        max_length=MAX_LENGTH,
        val_fraction=0.0,
        device="cpu",
        on_progress=on_progress,
    )
    total = time.perf_counter() - started
    steps = -(-len(rows) // batch_size)
    # the first step's time is not inside (first, last]; scale it back in as TRL's runtime includes it
    loop = (marks["last"] - marks["first"]) * steps / max(steps - 1, 1)
    return {"pairs": len(rows), "steps": steps, "loop_s": loop, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-python", default="/tmp/benchenv/bin/python")
    parser.add_argument("--trl-worker", nargs=3, metavar=("MODEL", "DATA", "OUT"))
    args = parser.parse_args()
    if args.trl_worker:
        model, data, out = args.trl_worker
        trl_worker(model, data, args.batch_size, args.threads, out)
        return

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import make_tiny_causal_lm

    rows = make_pairs(args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        corpus = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
        model = make_tiny_causal_lm(tmp_path / "gpt2", corpus, n_layer=2, n_embd=64, n_head=2, max_positions=256)
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results: dict[str, list[dict]] = {"prefnoise": [], "trl": []}
        for _ in range(args.repeats):  # alternate, so load on a shared machine hits both alike
            results["prefnoise"].append(prefnoise_run(model, rows, args.batch_size, args.threads))
            out = tmp_path / "trl.json"
            command = [
                args.trl_python,
                __file__,
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--trl-worker",
                str(model),
                str(data),
                str(out),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"TRL worker failed (is {args.trl_python} set up? see the docstring):\n{done.stderr[-3000:]}")
            results["trl"].append(json.loads(out.read_text()))

    best = {name: min(runs, key=lambda r: r["loop_s"]) for name, runs in results.items()}
    print(
        f"tiny GPT-2 (2 layers, 64 wide), {args.pairs} pairs, batch {args.batch_size}, 1 epoch, cpu, "
        f"{args.threads} threads, best of {args.repeats}"
    )
    print("| trainer | pairs | steps/s | pairs/s | end-to-end s |")
    print("|---|---|---|---|---|")
    for name, r in best.items():
        print(
            f"| {name} | {r['pairs']} | {r['steps'] / r['loop_s']:.1f} | {r['pairs'] / r['loop_s']:.0f} | "
            f"{r['total_s']:.2f} |"
        )
    ratio = (best["prefnoise"]["steps"] / best["prefnoise"]["loop_s"]) / (best["trl"]["steps"] / best["trl"]["loop_s"])
    end_to_end = best["trl"]["total_s"] / best["prefnoise"]["total_s"]
    print(f"\nprefnoise / TRL steps/s: {ratio:.2f}x; end-to-end: {end_to_end:.2f}x")


if __name__ == "__main__":
    main()
