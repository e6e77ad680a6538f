"""Score tables with a reward model: per pair (chosen_reward, rejected_reward) or per response (reward).

Numbers stay finite: NaN/inf feature vectors are refused (or dropped with ``drop_invalid``), and a model
whose rewards are NaN or inf is refused as damaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from prefnoise import columns as C
from prefnoise.batching import longest_first
from prefnoise.errors import PrefnoiseError
from prefnoise.metrics import tie_half_accuracy
from prefnoise.resources import check_inference_fits
from prefnoise.reward.models import RewardModel
from prefnoise.reward.validate import check_finite_features
from prefnoise.training import resolve_device

Progress = Callable[[int], None]
EVAL_BATCH = {"mlp": 8192, "embed+mlp": 8192, "transformer": 32}
RESPONSE = "response"


@dataclass
class Runtime:
    """Device and data-parallel layout of this process."""

    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


def scoring_runtime(device: str) -> Runtime:
    """This (single) process's device for scoring, with bf16 autocast on CUDA (training takes its
    layout from :func:`prefnoise.training.make_accelerator`)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return Runtime(dev, autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    return Runtime(dev)


def feature_array(df: pl.DataFrame, column: str) -> np.ndarray | None:
    """float32 (n, d) array of the fixed-size vectors in ``column`` (None when absent)."""
    if column not in df.columns:
        return None
    series = df[column]
    if series.null_count():
        raise PrefnoiseError(f"column {column!r} has {series.null_count()} null vectors; fill or drop those rows")
    if isinstance(series.dtype, pl.List):
        lengths = series.list.len().unique()
        if lengths.len() != 1:
            raise PrefnoiseError(f"column {column!r}: vectors have different lengths {sorted(lengths.to_list())[:5]}")
        series = series.list.to_array(int(lengths[0]))
    if not isinstance(series.dtype, pl.Array):
        raise PrefnoiseError(f"column {column!r} must hold fixed-size float vectors, not {series.dtype}")
    return series.to_numpy().astype(np.float32, copy=False)


def prompt_messages_of(model: RewardModel, df: pl.DataFrame) -> dict[str, Any]:
    """``prompt_messages=`` for ``model.prepare`` when the table is conversational (transformer backend)."""
    if model.backend != "transformer" or C.PROMPT_MESSAGES not in df.columns:
        return {}
    return {"prompt_messages": df[C.PROMPT_MESSAGES].to_list()}


def prepare_sides(
    model: RewardModel,
    df: pl.DataFrame,
    device: torch.device,
    on_progress: Progress | None,
    on_embed_start: Callable[[int], None] | None = None,
) -> list[Any]:
    """Prepared inputs of the chosen and the rejected responses of every row.

    Text backends leave what they had to cut in ``model.truncation`` (a list, one entry per side).
    embed+mlp first announces ``on_embed_start(total)``, the texts the encoder must run on (cache
    misses of both sides), embeds them all in one run of the encoder (one Ray Data execution under
    ``--engine ray``), advancing ``on_progress`` by the texts embedded, and then reads each side from
    the cache.
    """
    prompts = df[C.PROMPT].to_list()
    if hasattr(model, "embed_missing"):  # both sides' cache misses in one encoder run, before each side reads
        both = df[C.CHOSEN].to_list() + df[C.REJECTED].to_list()
        model.embed_missing(prompts + prompts, both, device=device, on_start=on_embed_start, on_progress=on_progress)
    wants_features = model.backend == "mlp"
    chat = prompt_messages_of(model, df)
    sides, truncation = [], []
    for side in (C.CHOSEN, C.REJECTED):
        sides.append(
            model.prepare(
                prompts,
                df[side].to_list(),
                feature_array(df, f"{side}_{C.FEATURES}") if wants_features else None,
                device=device,
                on_progress=on_progress,
                **chat,
            )
        )
        if getattr(model, "last_truncation", None) is not None:
            truncation.append(dict(model.last_truncation))
    model.truncation = truncation
    return sides


def eval_batches(index: np.ndarray, size: int, lengths: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Batches of positions into ``index``: consecutive, or (given each row's ``lengths``) longest first,
    so that a text backend pads little (``prefnoise.batching.longest_first``; callers put results back
    by position)."""
    if lengths is None:
        for start in range(0, len(index), size):
            yield np.arange(start, min(start + size, len(index)))
        return
    for batch in longest_first(range(len(index)), [lengths[i] for i in index], size):
        yield np.asarray(batch, dtype=np.int64)


def side_lengths(model: RewardModel, sides: Sequence[Any]) -> list[int] | None:
    """Per row, the padded width of its sides (the longest side's tokens) for a text backend, else None
    (feature vectors have no padding)."""
    if model.backend != "transformer" or not sides or not isinstance(sides[0], list):
        return None
    return [max(len(side[i]) for side in sides) for i in range(len(sides[0]))]


@torch.no_grad()
def pair_rewards(
    model: RewardModel,
    sides: Sequence[Any],
    index: np.ndarray,
    runtime: Runtime,
    batch_size: int,
    on_progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) float32 CPU rewards of rows ``index``, in eval mode."""
    module = model.module
    was_training = module.training
    module.eval()
    chosen, rejected = torch.zeros(len(index)), torch.zeros(len(index))
    lengths = side_lengths(model, sides)
    plan = list(eval_batches(index, batch_size, lengths))
    remote = getattr(model, "remote", None)
    if remote is None:
        _check_batches_fit(model, plan, index, lengths, len(sides), runtime)
        runs = (_forward(model, sides, index[positions], runtime) for positions in plan)
    else:  # the same batches on Ray actors (--engine ray), so every reward equals this process's
        runs = remote.rewards((model.sequences(sides, index[positions]) for positions in plan), len(plan))
    for positions, rewards in zip(plan, runs, strict=True):
        rows = index[positions]
        rewards = torch.as_tensor(rewards).reshape(len(sides), len(rows))
        chosen[positions] = rewards[0]
        rejected[positions] = rewards[1] if len(sides) > 1 else rewards[0]
        if on_progress is not None:
            on_progress(len(rows))
    module.train(was_training)
    return chosen, rejected


def _check_batches_fit(model: RewardModel, plan: Sequence[np.ndarray], index: np.ndarray,
                       lengths: Sequence[int] | None, n_sides: int, runtime: Runtime) -> None:
    """Refuse, with the estimate, a transformer whose largest eval batch's activations cannot fit (before
    the first pass allocates); its weights were checked when it loaded."""
    config = getattr(getattr(model.module, "model", model.module), "config", None)  # the wrapped HF model's
    if lengths is None or config is None or not plan:
        return
    widths = np.asarray(lengths)
    tokens = max(n_sides * len(positions) * int(widths[index[positions]].max()) for positions in plan)
    check_inference_fits(config, tokens, "the reward model's largest scoring batch",
                         "lower --batch-size or --max-length", device=runtime.device)


def _forward(model: RewardModel, sides: Sequence[Any], rows: np.ndarray, runtime: Runtime) -> Tensor:
    """float32 CPU rewards of rows ``rows`` of every side (side after side): one eval batch here."""
    with runtime.autocast():
        return model.module(**model.batch(sides, rows, runtime.device)).float().cpu()


def pairwise_accuracy(margin: Tensor, chosen_better: Tensor) -> float:
    """Agreement of the margins' signs with the label, by the project's one rule
    (:func:`prefnoise.metrics.tie_half_accuracy`: a predicted tie counts 1/2)."""
    sign = np.where(chosen_better.detach().cpu().numpy(), 1.0, -1.0)
    return tie_half_accuracy(margin.detach().float().cpu().numpy(), sign)


def check_finite_rewards(rewards: Sequence[Tensor], rows: np.ndarray, model_name: str | None = None) -> None:
    """PrefnoiseError when any reward is NaN or ±inf: a model that produces them is damaged or diverged.

    ``rewards``: per side, one reward per row; ``rows``: the 1-based row number of each row.
    """
    bad = torch.stack([~torch.isfinite(r) for r in rewards]) if rewards else torch.zeros(0, 0, dtype=torch.bool)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    first = int(bad.any(dim=0).nonzero()[0, 0])
    prefix = f"{model_name}: " if model_name else ""
    raise PrefnoiseError(
        f"{prefix}the model produced non-finite rewards for {n_bad} responses (first at row {int(rows[first])}); "
        "the model is damaged or diverged; train it again with `prefnoise fit-reward`"
    )


def checked_features(
    model: RewardModel, df: pl.DataFrame, columns: Sequence[str], source: str, drop_invalid: bool
) -> tuple[pl.DataFrame, np.ndarray]:
    """``df`` with finite feature vectors (when ``model`` reads them), and each kept row's 1-based number."""
    if model.backend != "mlp":
        return df, np.arange(1, df.height + 1)
    numbered = df.with_row_index("__row", offset=1)
    numbered, _ = check_finite_features(numbered, source, drop_invalid, columns=columns)
    return numbered.drop("__row"), numbered["__row"].to_numpy()


def score_table(
    model: RewardModel,
    df: pl.DataFrame,
    batch_size: int | None = None,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    drop_invalid: bool = False,
    source: str = "data",
    model_name: str | None = None,
    on_embed: Progress | None = None,
    on_embed_start: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """``df`` with float32 ``chosen_reward`` and ``rejected_reward`` from ``model``.

    ``on_progress(n)`` advances by rows scored; embed+mlp first calls ``on_embed_start(total)`` with the
    texts its encoder must run on (those not in the embedding cache) and ``on_embed(n)`` advances by them.

    Feature vectors (mlp) must be finite: a bad row raises PrefnoiseError naming ``source``, or with
    ``drop_invalid`` is left out of the result. Non-finite rewards (a damaged model, e.g. NaN
    weights) raise PrefnoiseError naming ``model_name``.
    """
    df, rows = checked_features(model, df, (C.chosen(C.FEATURES), C.rejected(C.FEATURES)), source, drop_invalid)
    runtime = scoring_runtime(device)
    model.module.to(runtime.device)
    sides = prepare_sides(model, df, runtime.device, on_embed, on_embed_start)
    chosen, rejected = pair_rewards(
        model, sides, np.arange(df.height), runtime, batch_size or EVAL_BATCH[model.backend], on_progress
    )
    check_finite_rewards([chosen, rejected], rows, model_name)
    return df.with_columns(
        pl.Series(C.chosen(C.REWARD), chosen.numpy(), dtype=pl.Float32),
        pl.Series(C.rejected(C.REWARD), rejected.numpy(), dtype=pl.Float32),
    )


def score_responses(
    model: RewardModel,
    df: pl.DataFrame,
    batch_size: int | None = None,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    drop_invalid: bool = False,
    source: str = "data",
    model_name: str | None = None,
    on_embed: Progress | None = None,
    on_embed_start: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """``df`` (one row per prompt, response) with a float32 ``reward`` column from ``model``.

    Finite features and finite rewards are checked, and the progress callbacks called, as in :func:`score_table`.
    """
    missing = [c for c in (C.PROMPT, RESPONSE) if c not in df.columns]
    if model.backend == "mlp":
        missing = [c for c in (C.FEATURES,) if c not in df.columns]
    if missing:
        raise PrefnoiseError(f"--responses needs column(s) {', '.join(missing)}; columns are {C.name_list(df.columns)}")
    df, numbers = checked_features(model, df, (C.FEATURES,), source, drop_invalid)
    runtime = scoring_runtime(device)
    model.module.to(runtime.device)
    n = df.height
    prompts = df[C.PROMPT].to_list() if C.PROMPT in df.columns else [""] * n
    responses = df[RESPONSE].to_list() if RESPONSE in df.columns else [""] * n
    if hasattr(model, "embed_missing"):  # every encoder input's cache misses in one encoder run
        model.embed_missing(prompts, responses, device=runtime.device, on_start=on_embed_start, on_progress=on_embed)
    side = model.prepare(
        prompts, responses, feature_array(df, C.FEATURES), device=runtime.device, on_progress=on_embed,
        **prompt_messages_of(model, df)
    )
    rewards, _ = pair_rewards(
        model, [side], np.arange(n), runtime, batch_size or EVAL_BATCH[model.backend], on_progress
    )
    check_finite_rewards([rewards], numbers, model_name)
    return df.with_columns(pl.Series(C.REWARD, rewards.numpy(), dtype=pl.Float32))
