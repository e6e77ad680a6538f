"""On-disk cache of response embeddings for ``embed+mlp``, shared by every encoder part and process.

All vectors of a cache directory live in one SQLite database, ``<cache_dir>/embeddings.sqlite3``
(:mod:`prefnoise.reward.store`: safe for concurrent readers and writers, every row checked on read).
A vector's key hashes the encoder part's fingerprint (encoder files, max length, input and pooling)
with the prompt and response, so flipping a label (which swaps chosen and rejected) or splitting a
table never serves the wrong vector, and every table that shares responses shares their embeddings.

Earlier versions kept one Parquet file per encoder part (``embeddings-<hash>.parquet``, rewritten whole
on every flush). Such a file is read into the database once, with a ``Note:``, and then left in place.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from prefnoise.locks import note
from prefnoise.outputs import default_cache_dir
from prefnoise.reward.store import VectorStore, row_key, store_for

FILL_CHUNK = 8192  # keys looked up at once: the vectors held beside the caller's array stay this few
_HEX_KEY = re.compile(r"^[0-9a-f]{32}$")

# vectors this process computed but could not store (the database was set aside): by (database, fingerprint)
_IN_MEMORY: dict[tuple[str, str], dict[str, np.ndarray]] = {}


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


def legacy_file(cache_dir: Path, encoder_fingerprint: str) -> Path:
    """Where an earlier prefnoise kept the Parquet cache of ``encoder_fingerprint``."""
    name = hashlib.blake2b(encoder_fingerprint.encode(), digest_size=10).hexdigest()
    return cache_dir / f"embeddings-{name}.parquet"


class EmbeddingCache:
    """The cached embeddings of one encoder part (a view of the directory's shared store)."""

    def __init__(self, store: VectorStore, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.memory = _IN_MEMORY.setdefault((str(store.path), fingerprint), {})
        self.damaged: set[bytes] = set()  # rows that failed their check: rewritten by the next add

    @classmethod
    def open(cls, cache_dir: str | Path | None, encoder_fingerprint: str, *, dim: int | None = None) -> EmbeddingCache:
        """The cache for ``encoder_fingerprint`` in ``cache_dir`` (default :func:`default_cache_dir`).

        An old-format file of this fingerprint is read into the store the first time (vectors of
        width ``dim`` only, when given).
        """
        directory = Path(cache_dir or default_cache_dir())
        cache = cls(store_for(directory), encoder_fingerprint)
        old = legacy_file(directory, encoder_fingerprint)
        if old.is_file() and not cache.store.imported(old):
            cache._import_legacy(old, dim)
        return cache

    keys_for = staticmethod(response_keys)

    def __contains__(self, key: str) -> bool:
        return key in self.memory or bool(self._read([key], None))

    def missing(self, keys: Sequence[str], dim: int | None = None) -> list[str]:
        """The distinct ``keys`` not cached (in first-seen order), read FILL_CHUNK keys at a time."""
        unique = list(dict.fromkeys(keys))
        absent: list[str] = []
        for start in range(0, len(unique), FILL_CHUNK):
            chunk = unique[start : start + FILL_CHUNK]
            found = self._read(chunk, dim)
            absent += [key for key in chunk if key not in found]
        return absent

    def fill(self, keys: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached vector of each ``keys[i]`` into ``out[i]``; bool mask of the rows filled.

        Reads FILL_CHUNK keys at a time, so memory beyond ``out`` stays bounded.
        """
        filled = np.zeros(len(keys), dtype=bool)
        for start in range(0, len(keys), FILL_CHUNK):
            found = self._read(keys[start : start + FILL_CHUNK], out.shape[1])
            for i, key in enumerate(keys[start : start + FILL_CHUNK], start):
                vector = found.get(key)
                if vector is not None:
                    out[i] = vector
                    filled[i] = True
        return filled

    def add(self, new: dict[str, np.ndarray]) -> None:
        """Store ``new`` vectors (in memory for this process when the database is set aside)."""
        if not new:
            return
        rows = [(row_key(self.fingerprint, key), vector) for key, vector in new.items()]
        if not self.store.write(rows, replace=self.damaged):
            self.memory.update(new)
        self.damaged.difference_update(key for key, _ in rows)

    def lookup(self, keys: Sequence[str], dim: int) -> np.ndarray:
        """float32 array (len(keys), dim) of cached vectors (KeyError naming a key that is not cached)."""
        out = np.zeros((len(keys), dim), dtype=np.float32)
        filled = self.fill(keys, out)
        if not filled.all():
            raise KeyError(keys[int(np.flatnonzero(~filled)[0])])
        return out

    def _read(self, keys: Sequence[str], dim: int | None) -> dict[str, np.ndarray]:
        """Verified vectors of ``keys``: this process's in-memory ones, then the store's."""
        found = {key: self.memory[key] for key in keys if key in self.memory}
        wanted = {row_key(self.fingerprint, key): key for key in dict.fromkeys(keys) if key not in found}
        damaged = []
        for db_key, vector in self.store.read(list(wanted), dim).items() if wanted else ():
            if vector is None:
                damaged.append(db_key)
            else:
                found[wanted[db_key]] = vector
        if damaged and not self.damaged:  # said once per part and call
            note(f"embedding cache {self.store.path}: {len(damaged)} rows failed their check and are computed again")
        self.damaged.update(damaged)
        return found

    def _import_legacy(self, old: Path, dim: int | None) -> None:
        """Read an old-format Parquet cache into the store once; an unreadable one is ignored with a note."""
        try:
            frame = pl.read_parquet(old, columns=["key", "embedding"])
            keys = frame["key"].cast(pl.String).to_list()
            lengths = frame["embedding"].list.len().unique().to_list()
            if len(lengths) > 1 or (dim is not None and lengths and lengths[0] != dim):
                raise ValueError(f"vectors of width {lengths}, expected {dim}")
            width = lengths[0] if lengths else 0
            matrix = np.asarray(frame["embedding"].to_list(), dtype=np.float32).reshape(len(keys), width)
        except Exception as error:  # a damaged old cache is only a cache: its vectors are computed again
            note(f"embedding cache: ignored the old cache file {old} ({str(error).splitlines()[0][:120]}); "
                 "its embeddings are computed again (prefnoise leaves the file in place)")
            self.store.mark_imported(old, -1)
            return
        good = [i for i, key in enumerate(keys) if _HEX_KEY.match(key or "") and np.isfinite(matrix[i]).all()]
        if self.store.write((row_key(self.fingerprint, keys[i]), matrix[i]) for i in good):
            self.store.mark_imported(old, len(good))
            note(f"embedding cache: read {len(good)} embeddings from the old cache file {old} into "
                 f"{self.store.path}; the old file is no longer used (prefnoise leaves it in place)")
