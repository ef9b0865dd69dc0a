"""The embedded adapter of the inference cache: one SQLite file, shared by the processes of one machine.

The file (by default ``IRE_HOME/cache.sqlite``) persists across runs. It runs in WAL mode, so
readers never wait for a writer and several processes (the flow process, Dask workers) can use
it at once; it needs a local file system (WAL does not work over NFS/SMB).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final

from engine.cache.base import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_SECONDS,
    CacheCounters,
    CacheStats,
    CacheUnavailableError,
    Claim,
    check_ttl,
    decode_found,
    encode_items,
    key_prefix,
    scoped_prefix,
)
from engine.core.errors import SpecError
from engine.core.evaluation import Evaluation
from engine.sqlite import use_wal

__all__ = ["EmbeddedCache"]

log = logging.getLogger(__name__)

_CHUNK: Final = 500  # keys per SELECT ... IN (...)
_LOW_WATER: Final = 0.9  # evict down to 90 % of a bound, so eviction does not run on every write
_PURGE_EVERY: Final = 300.0  # seconds between sweeps of expired entries (also at the first write)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL NOT NULL,
    last_used REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used);
CREATE INDEX IF NOT EXISTS entries_expires_at ON entries (expires_at);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
_CLAIM: Final = (
    "INSERT INTO claims (key, owner, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
)
_UPSERT: Final = (
    "INSERT INTO entries (key, value, expires_at, last_used, size) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, "
    "last_used = excluded.last_used, size = excluded.size"
)


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    """``keys`` in slices of at most ``_CHUNK`` (SQLite caps the parameters of one statement)."""
    for start in range(0, len(keys), _CHUNK):
        yield keys[start : start + _CHUNK]


def _check_bound(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SpecError(f"embedded cache {what} {value!r}: use a positive integer or None")
    return value


class EmbeddedCache:
    """An :class:`~engine.cache.InferenceCache` in a SQLite file: TTL, LRU bound, JSON values.

    ``max_entries`` and ``max_bytes`` (key + JSON value bytes) bound the file; when a write goes
    over a bound, expired entries and then the least recently used ones are deleted down to 90 %
    of it. A hit refreshes the entry's last use. Expired entries are misses and are deleted lazily.

    Thread-safe (one connection per process, behind a lock; a forked child opens its own) and
    safe for several processes on one machine (WAL, ``busy_timeout``). SQLite errors (a locked or
    unwritable file, a full disk) never raise from get/put/stats: they count as an outage, with one
    warning until the file works again.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        default_ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        max_bytes: int | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        self._path = Path(path)
        self._namespace = key_prefix(namespace)[:-1]
        self._default_ttl = check_ttl(default_ttl_seconds, DEFAULT_TTL_SECONDS)
        self._max_entries = _check_bound(max_entries, "max_entries")
        self._max_bytes = _check_bound(max_bytes, "max_bytes")
        self._check_every = (
            1 if self._max_bytes is not None or not self._max_entries else max(1, self._max_entries // 100)
        )
        self._written_since_check = 0
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._last_purge = 0.0
        self._down = False
        self._encode_warned = [False]
        self._counters = CacheCounters()

    @property
    def namespace(self) -> str:
        """The (sanitised) namespace of this cache's keys."""
        return self._namespace

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    # -- the port ---------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[Evaluation | None]:
        """The cached evaluations of ``keys`` in order (None = miss or expired)."""
        n = len(keys)
        if n == 0:
            return []
        now = time.time()
        unique = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        expired: list[str] = []
        with self._lock:
            try:
                conn = self._connection()
                for chunk in _chunks(unique):
                    rows = conn.execute(
                        f"SELECT key, value, expires_at FROM entries WHERE key IN ({_marks(len(chunk))})",
                        chunk,
                    )
                    for key, value, expires_at in rows:
                        if expires_at > now:
                            found[key] = value
                        else:
                            expired.append(key)
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
                self._counters.add(unavailable=n)
                return [None] * n
            self._succeeded()
            self._touch(conn, list(found), expired, now)
        out, hits, rejected = decode_found(keys, lambda _, key: found.get(key))
        with self._lock:
            self._counters.add(hits=hits, misses=n - hits, rejected=rejected)
        return out

    def put_many(self, items: Sequence[tuple[str, Evaluation]], ttl_seconds: float | None = None) -> None:
        """Store the items in one transaction, then enforce the LRU bound."""
        ttl = check_ttl(ttl_seconds, self._default_ttl)
        if not items:
            return
        encoded, skipped = encode_items(items, self._encode_warned)
        now = time.time()
        expires_at = now + ttl
        rows = [(key, value, expires_at, now, len(key) + len(value)) for key, value in encoded.items()]
        with self._lock:
            try:
                conn = self._connection()
                with self._transaction(conn):
                    conn.executemany(_UPSERT, rows)
                    self._enforce_bounds(conn, now, len(items))
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
                self._counters.add(unwritten=len(items))
                return
            self._succeeded()
            self._counters.add(writes=len(rows), unwritten=skipped)

    def claim_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[Claim]:
        """Leases as rows of a ``claims`` table, checked and taken in one write transaction (so
        atomic across the processes sharing the file); every key OWNED if the file is unusable."""
        ttl = check_ttl(ttl_seconds, self._default_ttl)
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        now = time.time()
        states: dict[str, Claim] = {}
        with self._lock:
            try:
                conn = self._connection()
                with self._transaction(conn):
                    for chunk in _chunks(unique):
                        marks = _marks(len(chunk))
                        for (key,) in conn.execute(
                            f"SELECT key FROM entries WHERE expires_at > ? AND key IN ({marks})",
                            [now, *chunk],
                        ):
                            states[key] = Claim.STORED
                        for key, holder in conn.execute(
                            f"SELECT key, owner FROM claims WHERE expires_at > ? AND key IN ({marks})",
                            [now, *chunk],
                        ):
                            if key not in states and holder != owner:
                                states[key] = Claim.BUSY
                    owned = [key for key in unique if key not in states]
                    conn.executemany(_CLAIM, [(key, owner, now + ttl) for key in owned])
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
                return [Claim.OWNED] * len(keys)
            self._succeeded()
        return [states.get(key, Claim.OWNED) for key in keys]

    def release_many(self, keys: Sequence[str], owner: str) -> None:
        """Delete the owner's own lease rows for ``keys``."""
        if not keys:
            return
        unique = list(dict.fromkeys(keys))
        with self._lock:
            try:
                conn = self._connection()
                with self._transaction(conn):
                    for chunk in _chunks(unique):
                        conn.execute(
                            f"DELETE FROM claims WHERE owner = ? AND key IN ({_marks(len(chunk))})",
                            [owner, *chunk],
                        )
            except (sqlite3.Error, OSError) as exc:  # the leases expire by themselves
                self._failed(exc)
                return
            self._succeeded()

    def stats(self) -> CacheStats:
        """Counters of this object, plus the file's entry count and entry bytes (key + value)."""
        entries: int | None = None
        memory: int | None = None
        with self._lock:
            try:
                row = self._connection().execute("SELECT count(*), coalesce(sum(size), 0) FROM entries")
                entries, memory = row.fetchone()
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
            else:
                self._succeeded()
            return self._counters.stats(entries=entries, memory_bytes=memory, backend="embedded")

    def clear(self, prefix: str = "") -> int:
        """Delete this namespace's entries whose key starts with ``prefix``; return how many."""
        prefix = scoped_prefix(self._namespace, prefix)
        with self._lock:
            try:
                conn = self._connection()
                with self._transaction(conn):
                    cursor = conn.execute(
                        "DELETE FROM entries WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
                    )
                    removed = cursor.rowcount
                    conn.execute("DELETE FROM claims WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
                raise CacheUnavailableError(
                    f"cannot clear the inference cache in {self._path}: {exc}"
                ) from None
            self._succeeded()
            return removed

    def close(self) -> None:
        """Close this process's connection to the file."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"EmbeddedCache({str(self._path)!r}, namespace={self._namespace!r})"

    # -- internals (called with the lock held) ----------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, opened (and the schema created) on first use."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            use_wal(conn, self._busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _touch(self, conn: sqlite3.Connection, hits: list[str], expired: list[str], now: float) -> None:
        """Refresh the last use of hits and delete expired entries; skipped if the file is busy."""
        if not hits and not expired:
            return
        try:
            with self._transaction(conn):
                for chunk in _chunks(hits):
                    conn.execute(
                        f"UPDATE entries SET last_used = ? WHERE key IN ({_marks(len(chunk))})",
                        [now, *chunk],
                    )
                for chunk in _chunks(expired):
                    conn.execute(
                        f"DELETE FROM entries WHERE expires_at <= ? AND key IN ({_marks(len(chunk))})",
                        [now, *chunk],
                    )
        except sqlite3.Error as exc:  # the hits are valid; only their LRU position is not refreshed
            log.debug("inference cache: could not refresh last use in %s: %s", self._path, exc)

    def _enforce_bounds(self, conn: sqlite3.Connection, now: float, written: int) -> None:
        """Purge expired entries now and then, and evict LRU entries down to 90 % of a bound."""
        if now - self._last_purge > _PURGE_EVERY:
            conn.execute("DELETE FROM entries WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
            self._last_purge = now
        # count(*) and sum(size) scan the whole table: check the bounds once ~1% of a bound has
        # been written by this process, not on every write (a bound may overshoot by that much).
        self._written_since_check += written
        if self._written_since_check < self._check_every:
            return
        self._written_since_check = 0
        if self._max_entries is not None:
            (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
            if count > self._max_entries:
                excess = count - int(self._max_entries * _LOW_WATER)
                conn.execute(
                    "DELETE FROM entries WHERE rowid IN "
                    "(SELECT rowid FROM entries ORDER BY last_used, rowid LIMIT ?)",
                    (excess,),
                )
        if self._max_bytes is not None:
            (total,) = conn.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()
            if total > self._max_bytes:
                need = total - int(self._max_bytes * _LOW_WATER)
                conn.execute(
                    "DELETE FROM entries WHERE rowid IN (SELECT rowid FROM (SELECT rowid, "
                    "sum(size) OVER (ORDER BY last_used, rowid ROWS UNBOUNDED PRECEDING) - size "
                    "AS before FROM entries) WHERE before < ?)",
                    (need,),
                )

    def _failed(self, exc: BaseException) -> None:
        """One warning per outage; drop the connection so the next call reopens the file."""
        if self._conn is not None and self._pid == os.getpid():
            with suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        if self._down:
            log.debug("inference cache: %s still unusable: %s", self._path, exc)
            return
        self._down = True
        log.warning(
            "inference cache: the embedded cache %s is unusable (%s: %s); the job goes on without it",
            self._path,
            type(exc).__name__,
            exc,
        )

    def _succeeded(self) -> None:
        if self._down:
            self._down = False
            log.info("inference cache: the embedded cache %s is usable again", self._path)
