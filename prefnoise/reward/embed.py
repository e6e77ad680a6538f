"""The ``embed+mlp`` backend: a frozen encoder embeds each (prompt, response) once (cached on disk);
an MLP is trained on the embeddings, optionally with length features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefnoise.data import file_fingerprint
from prefnoise.errors import PrefnoiseError
from prefnoise.hf import from_pretrained, quiet_transformers
from prefnoise.resources import check_inference_fits
from prefnoise.reward.cache import EmbeddingCache
from prefnoise.reward.models import (
    EMBED_INPUTS,
    ENCODER_DIR,
    FLUSH_EVERY,
    LENGTH,
    POOLINGS,
    MLPRewardModel,
    new_mlp,
    parse_embed_features,
)
from prefnoise.reward.networks import mean_pool
from prefnoise.reward.tokens import check_reward_model_dir, encode_pairs, load_tokenizer, pad_batch, tokenize_pairs

# --engine ray: gives an Encoder the runner of its encoder batches on Ray actors (None: they run here); set for
# a block by prefnoise.reward.remote.embedding_on, so every encoder a command builds inside it embeds on Ray
ENCODER_ENGINE: ContextVar[Callable[[Encoder], Any] | None] = ContextVar("encoder_engine", default=None)


def length_features(responses: Sequence[str]) -> np.ndarray:
    """float32 (n, 2): ln(1 + characters) and ln(1 + whitespace-separated words) of each response.

    Response length predicts preference labels on real data (longer answers win more often); the
    logs keep the two numbers on the scale of the embedding entries.
    """
    return np.array(
        [[np.log1p(len(r)), np.log1p(len(r.split()))] for r in responses], dtype=np.float32
    ).reshape(len(responses), 2)


def pool_states(states: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(n, hidden) pooled ``states``: ``mean`` over the attended positions or ``cls`` (position 0)."""
    if pooling == "mean":
        return mean_pool(states, attention_mask)
    if pooling == "cls":
        return states[:, 0]
    raise PrefnoiseError(f"unknown pooling {pooling!r}; use {' or '.join(POOLINGS)}")


class Encoder:
    """A frozen HF encoder that embeds (prompt, response) pairs or responses, with an on-disk cache.

    Each forward pass stores every pooling (mean and cls) in the cache, keyed by the text and by
    :meth:`part_fingerprint` (encoder files, max length, input and pooling), so an embedding is
    computed once across folds, losses, feature sets, runs and concurrent processes.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_length: int,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        what: str = "--encoder",
    ) -> None:
        self.path = check_reward_model_dir(path, what)
        self.what = what
        self.tokenizer = load_tokenizer(self.path, what)
        self._model: Any = None  # loaded on first use: a run whose texts are all cached never needs it
        self._config: Any = None
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._fingerprint: str | None = None
        self.forward_calls = 0  # encoder forward passes run by this object (the cache's tests count them)
        self.texts_encoded = 0  # distinct texts those passes embedded
        # where the encoder batches of cache misses run: here (None) or on Ray actors (--engine ray; an object
        # with ``embeddings(batches, total)`` yielding :meth:`pooled`'s result per batch, in order)
        self.remote: Any = None

    @property
    def model(self) -> Any:
        """The frozen encoder network, loaded on first use (its files were checked when this was built)."""
        if self._model is None:
            from transformers import AutoModel  # heavy (~1.5 s to import): loaded when the encoder must run

            self._model = from_pretrained(AutoModel, self.path, what=self.what, dtype=torch.float32).eval()
            self._model.requires_grad_(False)
        return self._model

    def load(self) -> Encoder:
        """Load the network now, so that damaged weights are an error at once rather than at the first cache miss."""
        _ = self.model
        return self

    @property
    def dim(self) -> int:
        """Embedding width (from the config: the network need not be loaded)."""
        if self._model is not None:
            return int(self._model.config.hidden_size)
        if self._config is None:
            from transformers import AutoConfig  # light beside AutoModel

            self._config = from_pretrained(AutoConfig, self.path, what=self.what)
        return int(self._config.hidden_size)

    @property
    def fingerprint(self) -> str:
        """Content hash of the encoder's files plus the embedding settings (the joint-mean cache key)."""
        if self._fingerprint is None:
            # "untrunc": the tokenizer's own truncation/padding is off (see _untruncated); "keepend":
            # prompts are cut from the left (encode_pairs). Caches without them hold damaged vectors.
            self._fingerprint = file_fingerprint(self.path) + f"-len{self.max_length}-mean-keepend-untrunc"
        return self._fingerprint

    def part_fingerprint(self, inputs: str, pooling: str) -> str:
        """The cache key of one (input, pooling) part; joint-mean keeps :attr:`fingerprint` itself."""
        if (inputs, pooling) == ("joint", "mean"):
            return self.fingerprint
        return f"{self.fingerprint}|{inputs}-{pooling}"

    def cache(self, inputs: str, pooling: str) -> EmbeddingCache:
        """The embedding cache of one (input, pooling) part in :attr:`cache_dir`."""
        return EmbeddingCache.open(self.cache_dir, self.part_fingerprint(inputs, pooling), dim=self.dim)

    def missing(self, prompts: Sequence[str], responses: Sequence[str], inputs: str = "joint") -> int:
        """How many distinct texts :meth:`embed` would have to run the encoder on (cache misses)."""
        cache = self.cache(inputs, "mean")
        return len(cache.missing(cache.keys_for(_inputs_prompts(prompts, inputs), responses), self.dim))

    @torch.no_grad()
    def embed(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        device: torch.device,
        on_progress: Callable[[int], None] | None = None,
        pooling: str = "mean",
        inputs: str = "joint",
    ) -> np.ndarray:
        """float32 array (n, dim) of embeddings, reusing and extending the cache.

        ``inputs``: joint (prompt and response as a text pair) or response (the response alone);
        ``pooling``: mean or cls. The encoder runs once per distinct text the cache lacks.
        ``on_progress(k)`` advances by the texts the encoder has just run on (cached texts are not
        counted; :meth:`missing` gives the total beforehand).
        """
        _check_inputs(inputs)
        pool_states(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validates pooling
        prompts = _inputs_prompts(prompts, inputs)
        caches = {p: self.cache(inputs, p) for p in POOLINGS}
        keys = caches[pooling].keys_for(prompts, responses)
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        absent = np.flatnonzero(~caches[pooling].fill(keys, out))
        if len(absent):
            self._encode([_misses(caches, keys, prompts, responses, {keys[i] for i in absent})], device, on_progress)
            out[absent] = caches[pooling].lookup([keys[i] for i in absent], self.dim)
        return out

    @torch.no_grad()
    def embed_missing(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        parts: Sequence[tuple[str, str]],
        *,
        device: torch.device,
        on_start: Callable[[int], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Embed every distinct text that any of ``parts`` ((input, pooling) pairs) lacks in the cache, storing
        every pooling: all in one run of encoder batches (one Ray Data execution under ``--engine ray``),
        cut per input in first-seen order, so later :meth:`embed` calls of these rows are cache hits.
        ``on_start(total)`` first gets the number of texts the encoder will run on; ``on_progress`` as in
        :meth:`embed`."""
        jobs = []
        for inputs in dict.fromkeys(i for i, _ in parts):
            _check_inputs(inputs)
            texts = _inputs_prompts(prompts, inputs)
            caches = {p: self.cache(inputs, p) for p in POOLINGS}
            keys = caches["mean"].keys_for(texts, responses)
            absent = {k for i, p in parts if i == inputs for k in caches[p].missing(keys, self.dim)}
            if absent:
                jobs.append(_misses(caches, keys, texts, responses, absent))
        if on_start is not None:
            on_start(sum(len(job.keys) for job in jobs))
        if jobs:
            self._encode(jobs, device, on_progress)

    def _encode(self, jobs: Sequence[_Misses], device: torch.device, on_progress: Callable[[int], None] | None
                ) -> None:
        """Run the encoder once per text of ``jobs`` (here, or on Ray actors under ``--engine ray``: one pass for
        all of them; batches of ``batch_size`` never mix jobs) and store every pooling in each job's caches."""
        engine = ENCODER_ENGINE.get()
        remote = self.remote if self.remote is not None or engine is None else engine(self)
        if remote is None:
            self.model.to(device)
        size = self.batch_size
        batches = [(job, start) for job in jobs for start in range(0, len(job.keys), size)]
        pairs = ((job.prompts[start : start + size], job.responses[start : start + size]) for job, start in batches)
        runs = remote.embeddings(pairs, len(batches)) if remote is not None else (
            self.pooled(batch_prompts, batch_responses, device) for batch_prompts, batch_responses in pairs
        )
        held = 0  # vectors computed and not yet stored (all poolings)
        for (job, start), pooled in zip(batches, runs, strict=True):
            keys = job.keys[start : start + size]
            self.texts_encoded += len(keys)
            for name in POOLINGS:
                job.new[name].update(zip(keys, pooled[name]))
            held += len(keys) * len(POOLINGS)
            if on_progress is not None:
                on_progress(len(keys))
            if held >= FLUSH_EVERY:  # an interrupted run keeps its work
                held = 0
                for each in jobs:
                    each.store()
        for job in jobs:
            job.store()

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str], responses: Sequence[str], device: torch.device) -> dict[str, np.ndarray]:
        """One encoder batch: float32 (n, dim) embeddings of the (prompt, response) pairs, per pooling
        (the unit of work :meth:`embed` runs here or, with :attr:`remote`, on Ray actors)."""
        ids = tokenize_pairs(self.tokenizer, prompts, responses, self.max_length)
        batch = {k: v.to(device) for k, v in pad_batch(ids, self.tokenizer.pad_token_id).items()}
        tokens = batch["input_ids"].numel()
        if tokens > getattr(self, "_checked_tokens", 0):  # before the pass allocates: one line, not killed
            self._checked_tokens = tokens
            check_inference_fits(self.model.config, tokens, f"the encoder {self.path}'s batch", "lower --max-length",
                                 device=device)
        states = self.model(**batch).last_hidden_state.float()
        self.forward_calls += 1
        return {name: pool_states(states, batch["attention_mask"], name).cpu().numpy() for name in POOLINGS}

    def save(self, directory: Path) -> None:
        """Copy the encoder and its tokenizer into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))


@dataclass
class _Misses:
    """The distinct texts of one encoder input that the cache lacks (first-seen order), and its caches (one per
    pooling) with the vectors computed and not yet stored."""

    caches: dict[str, EmbeddingCache]
    keys: list[str]
    prompts: list[str]
    responses: list[str]
    new: dict[str, dict[str, np.ndarray]] = field(default_factory=lambda: {p: {} for p in POOLINGS})

    def store(self) -> None:
        """Write the held vectors to the caches."""
        for name, vectors in self.new.items():
            self.caches[name].add(vectors)
            self.new[name] = {}


def _misses(caches: dict[str, EmbeddingCache], keys: Sequence[str], prompts: Sequence[str],
            responses: Sequence[str], absent: set[str]) -> _Misses:
    """The :class:`_Misses` of the rows whose key is in ``absent`` (each key once, at its first row)."""
    firsts: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key in absent:
            firsts.setdefault(key, row)
    rows = list(firsts.values())
    return _Misses(caches, [keys[i] for i in rows], [prompts[i] for i in rows], [responses[i] for i in rows])


def _check_inputs(inputs: str) -> None:
    """PrefnoiseError for an encoder input other than joint or response."""
    if inputs not in EMBED_INPUTS:
        raise PrefnoiseError(f"unknown encoder input {inputs!r}; use {' or '.join(EMBED_INPUTS)}")


def _inputs_prompts(prompts: Sequence[str], inputs: str) -> list[str]:
    """The prompts the encoder reads for ``inputs``: as given (joint) or empty (response alone)."""
    return list(prompts) if inputs == "joint" else [""] * len(prompts)


def embed_feature_dim(parts: Sequence[str], encoder_dim: int) -> int:
    """Width of the concatenated ``parts`` (each encoder part ``encoder_dim``, length 2)."""
    return sum(2 if part == LENGTH else encoder_dim for part in parts)


class EmbedMLPRewardModel(MLPRewardModel):
    """The ``embed+mlp`` backend: an MLP (or, with 0 layers, a linear head) on frozen-encoder features."""

    backend = "embed+mlp"

    def __init__(self, module: nn.Module, config: dict[str, Any], encoder: Encoder) -> None:
        super().__init__(module, config)
        self.encoder = encoder
        # counts of the latest prepare call: what the encoder's --max-length cut (see encode_pairs)
        self.last_truncation: dict[str, int] | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """The feature parts the MLP reads (see :func:`parse_embed_features`)."""
        return parse_embed_features(self.config.get("embed_features"))

    def _encoder_parts(self) -> list[tuple[str, str]]:
        return [tuple(part.split("-")) for part in self.parts if part != LENGTH]  # type: ignore[misc]

    def embed_missing(self, prompts: Sequence[str], responses: Sequence[str], *, device: torch.device,
                      on_start: Callable[[int], None] | None = None,
                      on_progress: Callable[[int], None] | None = None) -> None:
        """Embed every text of these rows that an encoder part lacks, in one run of the encoder (one Ray Data
        execution under ``--engine ray``), before :meth:`prepare` reads them per side from the cache;
        ``on_start(total)`` first gets how many texts that is (0 without encoder parts), ``on_progress``
        advances by the texts embedded."""
        parts = self._encoder_parts()
        if parts:
            self.encoder.embed_missing(prompts, responses, parts, device=device, on_start=on_start,
                                       on_progress=on_progress)
        elif on_start is not None:
            on_start(0)

    def prepare(self, prompts, responses, features, *, device, on_progress=None):
        inputs = [i for i, _ in self._encoder_parts()]
        self.last_truncation = None if not inputs else encode_pairs(  # every row, cached ones too
            self.encoder.tokenizer, _inputs_prompts(prompts, "joint" if "joint" in inputs else "response"),
            responses, self.encoder.max_length)[1]
        blocks = []
        for part in self.parts:
            if part == LENGTH:
                blocks.append(length_features(responses))
                continue
            inputs, pooling = part.split("-")
            blocks.append(
                self.encoder.embed(
                    prompts, responses, device=device, on_progress=on_progress, pooling=pooling, inputs=inputs
                )
            )
        return torch.as_tensor(np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0])

    def save(self, directory: Path) -> None:
        self.encoder.save(directory / ENCODER_DIR)
        super().save(directory)


def new_embed_mlp(
    encoder_path: str | Path,
    *,
    max_length: int,
    hidden: int,
    layers: int,
    dropout: float,
    output_clip: float | None,
    cache_dir: str | Path | None = None,
    embed_batch_size: int = 64,
    embed_features: str | Sequence[str] | None = None,
) -> EmbedMLPRewardModel:
    """An ``embed+mlp`` reward model on the frozen local encoder at ``encoder_path``.

    ``embed_features``: the parts the MLP reads (:func:`parse_embed_features`; default joint-mean);
    ``layers`` 0 makes the head linear (a Bradley–Terry logistic regression on the features under
    the sigmoid loss).
    """
    parts = parse_embed_features(embed_features)
    encoder = Encoder(encoder_path, max_length=max_length, batch_size=embed_batch_size, cache_dir=cache_dir)
    mlp = new_mlp(
        embed_feature_dim(parts, encoder.dim), hidden=hidden, layers=layers, dropout=dropout, output_clip=output_clip
    )
    config = {
        **mlp.config,
        "backend": "embed+mlp",
        "encoder": str(encoder.path),
        "encoder_fingerprint": encoder.fingerprint,
        "max_length": max_length,
        "embed_features": list(parts),
    }
    return EmbedMLPRewardModel(mlp.module, config, encoder)
