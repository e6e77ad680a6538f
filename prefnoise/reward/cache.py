"""On-disk cache of response embeddings for ``embed+mlp``, one Parquet file per encoder.

The file for an encoder is ``<cache_dir>/embeddings-<hash of encoder fingerprint>.parquet`` with
columns ``key`` (a hash of prompt and response) and ``embedding`` (list[float32]). Keys are per
response, not per pair, so flipping a label (which swaps chosen and rejected) or splitting a table
never serves the wrong vector, and every table that shares responses shares their embeddings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from prefnoise.atomic import atomic_path

CACHE_ENV = "PREFNOISE_CACHE_DIR"


def default_cache_dir() -> Path:
    """$PREFNOISE_CACHE_DIR, else ~/.cache/prefnoise."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefnoise")


def response_keys(prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """Cache key of each (prompt, response): blake2b of both, length-prefixed."""
    keys = []
    for prompt, response in zip(prompts, responses):
        digest = hashlib.blake2b(digest_size=16)
        for text in (prompt, response):
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        keys.append(digest.hexdigest())
    return keys


class EmbeddingCache:
    """Embeddings of one encoder, keyed by response; :meth:`add` rewrites the file atomically."""

    def __init__(self, path: Path, vectors: dict[str, np.ndarray]) -> None:
        self.path = path
        self.vectors = vectors

    @classmethod
    def open(cls, cache_dir: str | Path | None, encoder_fingerprint: str) -> EmbeddingCache:
        """The cache for ``encoder_fingerprint`` in ``cache_dir`` (empty if not there yet)."""
        name = hashlib.blake2b(encoder_fingerprint.encode(), digest_size=10).hexdigest()
        path = Path(cache_dir or default_cache_dir()) / f"embeddings-{name}.parquet"
        vectors: dict[str, np.ndarray] = {}
        if path.is_file():
            try:
                frame = pl.read_parquet(path)
                matrix = np.asarray(frame["embedding"].to_list(), dtype=np.float32)
                vectors = dict(zip(frame["key"].to_list(), matrix))
            except Exception:  # a damaged cache is only a cache: start over
                vectors = {}
        return cls(path, vectors)

    keys_for = staticmethod(response_keys)

    def __contains__(self, key: str) -> bool:
        return key in self.vectors

    def add(self, new: dict[str, np.ndarray]) -> None:
        """Insert ``new`` vectors and persist the whole cache."""
        self.vectors.update(new)
        keys = list(self.vectors)
        frame = pl.DataFrame(
            {
                "key": keys,
                "embedding": pl.Series([self.vectors[k].tolist() for k in keys], dtype=pl.List(pl.Float32)),
            }
        )
        with atomic_path(self.path) as tmp:
            frame.write_parquet(tmp, compression="zstd")

    def lookup(self, keys: Sequence[str], dim: int) -> np.ndarray:
        """float32 array (len(keys), dim) of cached vectors."""
        if not keys:
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self.vectors[k] for k in keys]).astype(np.float32, copy=False)
