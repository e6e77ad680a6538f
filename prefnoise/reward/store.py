"""The embedding cache's store: one SQLite database per cache directory, safe for many processes.

``<cache_dir>/embeddings.sqlite3`` in WAL mode (readers never wait for a writer; writers queue on a
busy timeout) with one table ``vectors(id, key, vector, digest)``: ``key`` is 16 bytes of blake2b over the
encoder part's fingerprint and the text, ``vector`` the float32 bytes, ``digest`` 8 bytes of blake2b
over key and vector. Inserts are ``INSERT OR IGNORE`` in one transaction per batch, so two processes
embedding the same texts both succeed and the first vector stays. A row whose digest does not match
(a damaged page, a row copied under another key) is never returned: it reads as a miss and is rewritten.

The store is only a cache: a database that cannot be opened, read or written (not a database, another
program's database, a read-only directory, a full disk, a lock held past the timeout) is set aside for
the rest of the process with one ``Note:`` line, and the vectors are kept in memory instead. The file is
never deleted or replaced.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from prefnoise.locks import note

STORE_NAME = "embeddings.sqlite3"
APPLICATION_ID = 0x706E6563  # "pnec": marks the database as prefnoise's embedding cache
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 120.0  # a writer waits this long for another process's transaction before giving up
READ_CHUNK = 500  # keys per SELECT (below SQLite's 999-variable floor; bounds the rows held at once)
WRITE_CHUNK = 4096  # rows per INSERT batch inside one transaction
JOURNAL_LIMIT = 4 << 20  # bytes the write-ahead log is cut back to after a checkpoint

# A rowid table (rows appended in order, vectors up to ~4 KB stored inline) with a unique index on the
# 16-byte key: keyed WITHOUT ROWID, a 1.5 KB vector would spill to an overflow page and double the file.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, vector BLOB NOT NULL,"
    " digest BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS imported (file TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, rows INTEGER)",
)


class StoreUnavailable(Exception):
    """The database cannot serve this process (the message says why, in a few words)."""


def row_key(fingerprint: str, text_key: str) -> bytes:
    """The 16-byte database key of ``text_key`` (a :func:`response_keys` hash) under an encoder part."""
    digest = hashlib.blake2b(digest_size=16)
    data = fingerprint.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
    digest.update(text_key.encode("ascii"))
    return digest.digest()


def row_digest(key: bytes, vector: bytes) -> bytes:
    """8 bytes of blake2b over a row's key and vector bytes (checked on every read)."""
    return hashlib.blake2b(key + vector, digest_size=8).digest()


def _why(error: BaseException) -> str:
    """A few words for a SQLite or OS error."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class VectorStore:
    """One process's connection to a cache directory's database (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed: str | None = None  # why the store was set aside, once it was
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        """An initialised connection (raises sqlite3/OS errors, or StoreUnavailable for a foreign database)."""
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        if self._connection is not None:  # forked: the parent's connection is neither used nor closed here
            _INHERITED.append(self._connection)
        self._pid, self._connection = os.getpid(), None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _check_ours(connection)
            connection.execute("PRAGMA journal_mode = WAL")  # kept as it is where the file system refuses WAL
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT}")
            connection.execute("BEGIN IMMEDIATE")
            try:
                _check_ours(connection)  # again, under the write lock: another process may have just made it
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def set_aside(self, error: BaseException) -> None:
        """Stop using the database for the rest of the process, saying why in one ``Note:`` line."""
        if self.failed is None:
            self.failed = _why(error)
            note(
                f"embedding cache {self.path}: {self.failed}; embeddings are kept in memory for this run instead "
                "(prefnoise leaves the file as it is; move it aside or fix the directory to cache again)"
            )
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                pass
            self._connection = None

    def read(self, keys: Sequence[bytes], dim: int | None) -> dict[bytes, np.ndarray | None]:
        """The verified vectors of those ``keys`` the database holds, READ_CHUNK at a time.

        A row that fails its digest or width check (``dim`` floats; any whole number when None) maps
        to None (damaged: a miss, to be rewritten).
        """
        found: dict[bytes, np.ndarray | None] = {}
        if self.failed is not None or not keys:
            return found
        unique = list(dict.fromkeys(keys))
        try:
            with self._lock:
                connection = self._connect()
                for start in range(0, len(unique), READ_CHUNK):
                    chunk = unique[start : start + READ_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = connection.execute(f"SELECT key, vector, digest FROM vectors WHERE key IN ({marks})", chunk)
                    for key, vector, digest in rows:
                        width_ok = len(vector) % 4 == 0 if dim is None else len(vector) == 4 * dim
                        ok = width_ok and row_digest(bytes(key), bytes(vector)) == bytes(digest)
                        found[bytes(key)] = np.frombuffer(vector, dtype=np.float32).copy() if ok else None
        except (sqlite3.Error, OSError, StoreUnavailable) as error:
            self.set_aside(error)
        return found

    def write(self, rows: Iterable[tuple[bytes, np.ndarray]], *, replace: set[bytes] | frozenset = frozenset()) -> bool:
        """Insert ``rows`` (key, float32 vector) in one transaction; False if the store was set aside.

        Keys already present keep their vector, except those in ``replace`` (rows found damaged).
        """
        if self.failed is not None:
            return False
        batch = [(key, vector.astype(np.float32, copy=False).tobytes()) for key, vector in rows]
        records = [(key, blob, row_digest(key, blob)) for key, blob in batch]
        try:
            with self._lock:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    for start in range(0, len(records), WRITE_CHUNK):
                        chunk = records[start : start + WRITE_CHUNK]
                        connection.executemany("INSERT OR IGNORE INTO vectors (key, vector, digest) VALUES (?, ?, ?)",
                                               [r for r in chunk if r[0] not in replace])
                        connection.executemany("INSERT OR REPLACE INTO vectors (key, vector, digest) VALUES (?, ?, ?)",
                                               [r for r in chunk if r[0] in replace])
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError, StoreUnavailable) as error:
            self.set_aside(error)
            return False
        return True

    def imported(self, file: Path) -> bool:
        """Whether ``file`` (an old-format cache file, same size and mtime) was read into the store already."""
        if self.failed is not None:
            return True  # nowhere to import it to
        stat = file.stat()
        try:
            with self._lock:
                row = self._connect().execute(
                    "SELECT 1 FROM imported WHERE file = ? AND size = ? AND mtime_ns = ?",
                    (str(file.resolve()), stat.st_size, stat.st_mtime_ns),
                ).fetchone()
        except (sqlite3.Error, OSError, StoreUnavailable) as error:
            self.set_aside(error)
            return True
        return row is not None

    def mark_imported(self, file: Path, rows: int) -> None:
        """Record that ``file`` was read (``rows`` vectors taken, -1 when it was unreadable)."""
        if self.failed is not None:
            return
        stat = file.stat()
        try:
            with self._lock:
                self._connect().execute(
                    "INSERT OR REPLACE INTO imported VALUES (?, ?, ?, ?)",
                    (str(file.resolve()), stat.st_size, stat.st_mtime_ns, rows),
                )
        except (sqlite3.Error, OSError, StoreUnavailable) as error:
            self.set_aside(error)

    def count(self) -> int:
        """Rows in the store (tests and the benchmark read it)."""
        with self._lock:
            return int(self._connect().execute("SELECT count(*) FROM vectors").fetchone()[0])


def _check_ours(connection: sqlite3.Connection) -> None:
    """Raise StoreUnavailable unless the database is empty or prefnoise's embedding cache (schema 1)."""
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(f"written by a newer prefnoise (cache schema {version}, this one reads 1)")
        return
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != 0 or tables:
        raise StoreUnavailable("not a prefnoise embedding cache (another program's database)")


_STORES: dict[tuple[str, int], VectorStore] = {}
_INHERITED: list[sqlite3.Connection] = []  # a forked child's copies of its parent's connections, kept unclosed
_STORES_LOCK = threading.Lock()


def store_for(cache_dir: Path) -> VectorStore:
    """This process's store of ``cache_dir`` (one connection per directory and process)."""
    path = cache_dir / STORE_NAME
    with _STORES_LOCK:
        return _STORES.setdefault((str(path.absolute()), os.getpid()), VectorStore(path))
