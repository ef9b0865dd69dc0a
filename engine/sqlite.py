"""SQLite helpers shared by the embedded cache and the embedded store."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

__all__ = ["use_wal"]


def use_wal(cursor: Any, timeout_seconds: float) -> None:
    """Put the database of ``cursor`` (a DB-API cursor or connection of :mod:`sqlite3`) in WAL mode.

    WAL is a property of the file, so a connection finding it already set changes nothing. On a new
    file, ``PRAGMA journal_mode = WAL`` needs the file to itself, and SQLite answers "database is
    locked" at once, without waiting out ``busy_timeout``, when another process opens the file at
    the same moment; so it is retried here for up to ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        else:
            return  # "wal", or the mode of a database that cannot be WAL (one in memory)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
