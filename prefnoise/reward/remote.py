"""Forward passes on Ray actors (``--engine ray``): the driver plans, the actors run the network.

The driver runs the one-process code path unchanged (reading, tokenising, the truncation counts, the
embedding cache, the MLP head, writing), and only hands its network batches out: encoder batches of
cache misses (:meth:`prefnoise.reward.embed.Encoder.embed`) and reward-model eval batches
(:func:`prefnoise.reward.scoring.pair_rewards`). Each batch is exactly the batch the local engine would
run, so every embedding and reward equals the one-process run bit for bit; results come back in order
(:func:`prefnoise.engine.map_blocks`). Each actor loads the model once per pass (one Ray Data execution: one
encoder run over every cache miss of a command's rows, both sides and all encoder inputs; or a table's eval
batches), on its GPU when the cluster has GPUs, else on CPU;
``trust_remote_code`` stays off (the loaders never pass it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from prefnoise.engine import BlockInfo, RaySession, map_blocks, ray_session, require_ray
from prefnoise.errors import PrefnoiseError
from prefnoise.options import EngineOptions
from prefnoise.reward.embed import ENCODER_ENGINE
from prefnoise.reward.tokens import pad_batch

BATCH = "batch"  # a block's column: which network batch of the block the row belongs to
BLOCKS_PER_WORKER = 4  # a pass is cut into a few blocks per worker (a slow block holds up little)


@dataclass(frozen=True)
class ModelSource:
    """What an actor loads: ``kind`` "encoder" (a frozen encoder directory at ``path`` with ``max_length``)
    or "reward" (a reward model directory or cached hub id at ``path``); ``device`` as ``--device``."""

    kind: str
    path: str
    max_length: int = 0
    device: str = "auto"
    cache_dir: str | None = None


class _Worker:
    """One actor's model, loaded once; called per block of network batches."""

    def __init__(self, source: ModelSource) -> None:
        from prefnoise.reward.loading import load_reward_model  # loaded on the actor, not at import
        from prefnoise.reward.scoring import scoring_runtime  # same

        self.source = source
        self.runtime = scoring_runtime(source.device)
        if source.kind == "encoder":
            from prefnoise.reward.embed import Encoder  # same

            self.encoder = Encoder(source.path, max_length=source.max_length)
            self.encoder.model.to(self.runtime.device)
        else:
            self.model = load_reward_model(source.path, cache_dir=source.cache_dir)
            self.model.module.to(self.runtime.device).eval()

    @torch.no_grad()
    def __call__(self, frame: pl.DataFrame, info: BlockInfo) -> list[Any]:
        """Each network batch of the block, in order: pooled embeddings (a dict per pooling) or rewards."""
        out = []
        for _, part in frame.group_by(BATCH, maintain_order=True):
            if self.source.kind == "encoder":
                out.append(self.encoder.pooled(part["prompt"].to_list(), part["response"].to_list(),
                                               self.runtime.device))
            else:
                ids = pad_batch(part["ids"].to_list(), self.model.tokenizer.pad_token_id)
                with self.runtime.autocast():
                    rewards = self.model.module(**{k: v.to(self.runtime.device) for k, v in ids.items()})
                out.append(rewards.float().cpu().numpy())
        return out


class RemoteForward:
    """The network batches of one model, run on Ray actors in ``session`` (set it as ``Encoder.remote``
    or ``RewardModel.remote``; see the module's docstring)."""

    def __init__(self, session: RaySession, source: ModelSource) -> None:
        self.session, self.source = session, source
        ray = require_ray()
        wants_gpu = source.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        self.num_gpus = 1 if wants_gpu else 0

    def embeddings(self, batches: Iterable[tuple[Sequence[str], Sequence[str]]], total: int) -> Iterator[dict]:
        """Pooled embeddings of each (prompts, responses) encoder batch (``total`` of them), in order."""
        frames = (
            pl.DataFrame({BATCH: np.repeat(np.arange(len(group)), [len(p) for p, _ in group]),
                          "prompt": [t for p, _ in group for t in p], "response": [t for _, r in group for t in r]},
                         schema={BATCH: pl.Int64, "prompt": pl.String, "response": pl.String})
            for group in _blocks(batches, self._per_block(total))
        )
        yield from self._run(frames)

    def rewards(self, batches: Iterable[list[list[int]]], total: int) -> Iterator[np.ndarray]:
        """Rewards of each eval batch (token ids of its sequences, side after side; ``total`` of them), in order."""
        frames = (
            pl.DataFrame({BATCH: np.repeat(np.arange(len(group)), [len(b) for b in group]),
                          "ids": [ids for batch in group for ids in batch]},
                         schema={BATCH: pl.Int64, "ids": pl.List(pl.Int64)})
            for group in _blocks(batches, self._per_block(total))
        )
        yield from self._run(frames)

    def _per_block(self, total: int) -> int:
        """Network batches per block: a few blocks per worker."""
        return max(1, math.ceil(total / (BLOCKS_PER_WORKER * self.session.workers)))

    def _run(self, frames: Iterable[pl.DataFrame]) -> Iterator[Any]:
        # one Ray Data execution per pass: the actors start and load the model once (the driver holds the
        # pass's inputs as blocks meanwhile, beside the table it holds anyway)
        for results in map_blocks(self.session, frames, _Worker, setup=(self.source,), num_gpus=self.num_gpus,
                                  window=None):
            yield from results


def _blocks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in consecutive groups of ``size`` (the last may be shorter)."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def encoder_source(encoder: Any, device: str) -> ModelSource:
    """The :class:`ModelSource` of an :class:`~prefnoise.reward.embed.Encoder` (its directory and max length)."""
    return ModelSource("encoder", str(encoder.path), max_length=encoder.max_length, device=device)


def reward_source(model: Any, device: str, cache_dir: str | Path | None) -> ModelSource:
    """The :class:`ModelSource` of a reward model given by directory or hub id; PrefnoiseError for one in
    memory (the actors load it by name)."""
    if not isinstance(model, str | Path):
        raise PrefnoiseError("--engine ray scores a model given by directory or hub id (actors load it by name)")
    return ModelSource("reward", str(model), device=device, cache_dir=None if cache_dir is None else str(cache_dir))


@contextlib.contextmanager
def embedding_on(engine: EngineOptions | None, device: str) -> Iterator[RaySession | None]:
    """With ``engine`` ray, a Ray session for the block in which every encoder's batches of cache misses run
    on Ray actors (on ``device``; the embedding stage of score and audit); otherwise nothing changes."""
    if engine is None or not engine.distributed:
        yield None
        return
    with ray_session(engine) as session:
        token = ENCODER_ENGINE.set(lambda encoder: RemoteForward(session, encoder_source(encoder, device)))
        try:
            yield session
        finally:
            ENCODER_ENGINE.reset(token)
