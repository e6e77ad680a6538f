"""Benchmarks of `prefnoise align` on a tiny GPT-2 (CPU).

    .venv/bin/python bench/align.py robustness [--seeds 3]
    PYTHONPATH=. /tmp/benchenv/bin/python bench/align.py trl [--steps 10] [--repeats 2] [--threads 1]

robustness: the full grid of `prefnoise reproduce alignment` (prefnoise.experiments.alignment):
the generated `quality_pairs` task, labels flipped at 0/20/40% (symmetric) and 30%/10%
(asymmetric), held-out clean implicit-reward accuracy for dpo, cdpo, rdpo, ipo, sympo-sigmoid and
sympo-ramp over several seeds.

trl: the same tiny model, data, batch size, sequence length, learning-rate schedule, optimizer,
gradient clipping and batch order through prefnoise's `align --loss dpo` and TRL's DPOTrainer, in
one process, interleaved; prints every step's loss for both (they agree to ~1e-6 in fp32) and the
throughput ratio (end-to-end wall time: model load, tokenization, reference pass, training).
TRL's DPOConfig defaults to bf16 autocast (even on CPU), gradient checkpointing and fused AdamW;
the bench turns those off so both run the same fp32 arithmetic. With 2 threads on a loaded
2-core machine every small torch op waits for a descheduled thread (~4 ms each), so 1 thread is
both faster and steadier here.
TRL is installed only in a separate environment, never in the project's .venv:

    python3 -m venv /tmp/benchenv
    /tmp/benchenv/bin/pip install "torch==2.13.0" trl polars   # torch 2.13.0 resolves to the local CPU wheel
    PYTHONPATH=. /tmp/benchenv/bin/python bench/align.py trl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefnoise.experiments.tiny_lm import EOS, make_tiny_causal_lm, pattern_pairs, pattern_texts  # noqa: E402
from prefnoise.policy import AlignConfig, epoch_permutation, train  # noqa: E402


def robustness(args: argparse.Namespace) -> None:
    """The full `reproduce alignment` grid (same code path), printed as a Markdown table with timings."""
    import torch

    from prefnoise.experiments import alignment as A

    torch.set_num_threads(args.threads)
    config = A.with_overrides(A.AlignmentConfig(), seeds=args.seeds, epochs=args.epochs, pairs=args.pairs)
    started = time.perf_counter()

    def report(row: dict) -> None:
        print(
            f"{row['kind']} {row['rate']} {row['loss']} seed {row['seed']}: clean acc {row['clean_accuracy']:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    results = A.run_alignment(config, on_cell=report)
    print(A.summary_markdown(results, config, "bench/align.py robustness"))
    print(json.dumps({"seconds": round(time.perf_counter() - started), "load_average": os.getloadavg()}))


def versus_trl(args: argparse.Namespace) -> None:
    """prefnoise align --loss dpo vs TRL DPOTrainer: per-step losses and tokens/s, same everything.

    The two run alternately ``--repeats`` times in this process (prefnoise, TRL, prefnoise, ...),
    so both see the same machine load; the median wall time of each gives the throughput ratio.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-align-trl-"))
    model_path = make_tiny_causal_lm(work / "lm", pattern_texts(), n_layer=4, n_embd=128, n_head=4)
    batch, steps, seed, lr = 8, args.steps, 0, args.lr
    # BOS written into the prompt text: TRL does not add one, prefnoise always starts the prompt with it.
    frame = pattern_pairs(batch * steps, seed=seed, response_words=8).with_columns(
        (pl.lit(EOS) + pl.col("prompt")).alias("prompt")
    )
    order = epoch_permutation(frame.height, seed, 0)  # prefnoise's batch order, replayed by TRL sequentially
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    dataset = Dataset.from_polars(frame[order].select("prompt", "chosen", "rejected"))

    def run_prefnoise(i: int) -> tuple[list[float], float, int, dict]:
        cfg = AlignConfig(
            model=str(model_path),
            out=str(work / f"prefnoise-{i}"),
            loss="dpo",
            beta=0.1,
            lr=lr,
            batch_size=batch,
            batching="exact",  # the order TRL replays below
            max_steps=steps,
            seed=seed,
            max_length=64,
            max_prompt_length=32,
            log_every=1,
            device="cpu",
            precision="fp32",
        )
        losses: list[float] = []
        t0 = time.perf_counter()
        summary = train(cfg, frame, on_log=lambda r: losses.append(r["loss"]) if r["split"] == "train" else None)
        return losses, time.perf_counter() - t0, summary["tokens"], summary

    def run_trl(i: int, precompute: bool = False) -> tuple[list[float], float]:
        config = DPOConfig(
            output_dir=str(work / f"trl-{i}-{precompute}"),
            precompute_ref_log_probs=precompute,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=64,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            seed=seed,
            train_sampling_strategy="sequential",
            save_strategy="no",
            disable_dropout=True,
            dataloader_num_workers=0,
            optim=args.optim,
            disable_tqdm=True,
            # TRL's defaults differ from plain fp32 training: bf16 autocast (even on CPU) and
            # gradient checkpointing are on, and the optimizer is fused AdamW. Match prefnoise.
            bf16=False,
            gradient_checkpointing=False,
        )
        losses: list[float] = []

        class Losses(TrainerCallback):
            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        t0 = time.perf_counter()
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Losses()],
        )
        trainer.train()
        return losses, time.perf_counter() - t0

    ours_times, trl_times, trl_pre_times = [], [], []
    load_before = os.getloadavg()
    for i in range(args.repeats):
        ours, seconds, tokens, summary = run_prefnoise(i)
        ours_times.append(seconds)
        theirs, seconds = run_trl(i)
        trl_times.append(seconds)
        theirs_pre, seconds = run_trl(i, precompute=True)  # TRL with its own cached reference pass
        trl_pre_times.append(seconds)
        assert max(abs(a - b) for a, b in zip(theirs, theirs_pre, strict=True)) < 1e-4
        if i == 0:
            first_ours, first_theirs = ours, theirs
    load_after = os.getloadavg()
    ours, theirs = first_ours, first_theirs
    diffs = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
    agree = next((i for i, d in enumerate(diffs) if d >= 1e-4), len(diffs))
    print(f"{'step':>4} {'prefnoise':>10} {'trl':>10} {'abs diff':>10}")
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        print(f"{i + 1:>4} {a:>10.6f} {b:>10.6f} {abs(a - b):>10.2e}")
    ours_s, trl_s = statistics.median(ours_times), statistics.median(trl_times)
    result = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "trl_optim": args.optim,
        "tokens": tokens,
        "parameters": summary["parameters"],
        "first_step_abs_diff": diffs[0],
        "steps_agreeing_to_1e-4": agree,
        "max_abs_diff_all_steps": max(diffs),
        "prefnoise_seconds": [round(t, 2) for t in ours_times],
        "trl_seconds": [round(t, 2) for t in trl_times],
        "prefnoise_tokens_per_s": round(tokens / ours_s),
        "trl_tokens_per_s": round(tokens / trl_s),
        "throughput_ratio": round(trl_s / ours_s, 2),
        "trl_precompute_ref_seconds": [round(t, 2) for t in trl_pre_times],
        "throughput_ratio_vs_trl_precompute_ref": round(statistics.median(trl_pre_times) / ours_s, 2),
        "threads": args.threads,
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(json.dumps(result))
    assert diffs[0] < 1e-4, "first-step losses differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    rob = sub.add_parser("robustness")
    rob.add_argument("--seeds", type=int, default=3)
    rob.add_argument("--pairs", type=int, default=None)
    rob.add_argument("--epochs", type=int, default=None)
    rob.add_argument("--threads", type=int, default=1)
    trl = sub.add_parser("trl")
    trl.add_argument("--steps", type=int, default=40)
    trl.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    trl.add_argument("--lr", type=float, default=1e-3)
    trl.add_argument("--optim", default="adamw_torch", help="TRL/Trainer optimizer (adamw_torch = prefnoise's)")
    trl.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; median wall time")
    args = parser.parse_args()
    robustness(args) if args.which == "robustness" else versus_trl(args)


if __name__ == "__main__":
    main()
