"""One pair_id, one pair: find ids that rows with different content share.

Noise is keyed by pair_id, so every row of one id flips together. That is right for a pair repeated
verbatim (or in the other orientation), and silently wrong when unrelated pairs share an id. The
check keeps 8 bytes per row (a 64-bit hash of its id); only when some id occurs more than once is the
input read again, to compare the content of those rows (and name the rows of a conflict). Hashing
every row's text on the way would cost more than the rest of ``corrupt`` together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError

_SEED = 0x5EED


def _content_hash(frame: pl.DataFrame) -> np.ndarray:
    """A 64-bit hash of (prompt, {chosen, rejected}): the same for a pair in either orientation."""
    hashes = frame.select(
        pl.col(C.PROMPT).hash(_SEED).alias("p"),
        pl.min_horizontal(pl.col(C.CHOSEN).hash(_SEED), pl.col(C.REJECTED).hash(_SEED)).alias("a"),
        pl.max_horizontal(pl.col(C.CHOSEN).hash(_SEED), pl.col(C.REJECTED).hash(_SEED)).alias("b"),
    )
    p, a, b = (hashes[name].to_numpy().astype(np.uint64) for name in ("p", "a", "b"))
    with np.errstate(over="ignore"):
        return p ^ (a * np.uint64(0x9E3779B97F4A7C15)) ^ (b * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(1))


class PairIdCheck:
    """Watches canonical batches go by and, after the last, raises if a pair_id is shared by different pairs.

    ``reread`` yields the same batches again; it is called only when some pair_id occurs more than once.
    """

    def __init__(self, name: str, reread: Callable[[], Iterable[pl.DataFrame]]) -> None:
        self.name = name
        self.reread = reread
        self._ids: list[np.ndarray] = []

    def watch(self, batches: Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
        """Pass ``batches`` through unchanged, remembering each row's id hash; after the last batch
        raise PrefnoiseError on a conflict (so a writer consuming them never commits)."""
        for frame in batches:
            self._ids.append(frame[C.PAIR_ID].hash(_SEED).to_numpy().astype(np.uint64))
            yield frame
        self.raise_if_conflicts()

    def repeated_id_hashes(self) -> np.ndarray:
        """Hashes of the pair_ids seen more than once (sorted): the only ones that can conflict."""
        if not self._ids:
            return np.zeros(0, dtype=np.uint64)
        ids = np.sort(np.concatenate(self._ids))
        return np.unique(ids[1:][ids[1:] == ids[:-1]])

    def conflicting_id_hashes(self) -> np.ndarray:
        """Hashes of the pair_ids that occur with more than one content (sorted); reads the input
        again when an id repeats."""
        repeated = self.repeated_id_hashes()
        if repeated.size == 0:
            return repeated
        ids, contents = [], []
        for frame in self.reread():
            id_hashes = frame[C.PAIR_ID].hash(_SEED).to_numpy().astype(np.uint64)
            hit = np.isin(id_hashes, repeated)
            if hit.any():
                ids.append(id_hashes[hit])
                contents.append(_content_hash(frame.filter(pl.Series(hit))))
        ids_all, contents_all = np.concatenate(ids), np.concatenate(contents)
        order = np.lexsort((contents_all, ids_all))
        ids_all, contents_all = ids_all[order], contents_all[order]
        differs = (ids_all[1:] == ids_all[:-1]) & (contents_all[1:] != contents_all[:-1])
        return np.unique(ids_all[1:][differs])

    def raise_if_conflicts(self) -> None:
        """PrefnoiseError naming the first shared pair_id and two of its rows, if there is one."""
        bad = self.conflicting_id_hashes()
        if bad.size == 0:
            return
        rows_seen: dict[str, tuple[int, np.uint64]] = {}
        offset = 0
        for frame in self.reread():
            id_hashes = frame[C.PAIR_ID].hash(_SEED).to_numpy().astype(np.uint64)
            hit = np.flatnonzero(np.isin(id_hashes, bad))
            contents = _content_hash(frame)
            for i in hit:
                pair_id = frame[C.PAIR_ID][int(i)]
                if pair_id not in rows_seen:
                    rows_seen[pair_id] = (offset + int(i) + 1, contents[i])
                elif rows_seen[pair_id][1] != contents[i]:
                    raise PrefnoiseError(
                        f"{self.name}: pair_id {pair_id!r} is shared by rows with different content (data rows "
                        f"{rows_seen[pair_id][0]} and {offset + int(i) + 1}; {bad.size} such id(s)), so they would "
                        "flip together; give each pair its own id, or drop the pair_id column to derive ids "
                        "from the content"
                    )
            offset += frame.height
        raise PrefnoiseError(f"{self.name}: {bad.size} pair_id(s) are shared by rows with different content")
