"""Processes opening one new SQLite file at the same moment all get it in WAL mode: the mode change
that SQLite refuses at once while another process opens the file is retried (CI once saw the
embedded cache give up on such a file, so two jobs computed every candidate twice)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from engine.sqlite import use_wal

SPAWN = multiprocessing.get_context("spawn")
ROUNDS = 12


def _open_at_once(paths: Any, barrier: Any, answers: Any) -> None:
    """For each path: meet the other process, open the file and switch it to WAL."""
    while (path := paths.get()) is not None:
        barrier.wait(60)
        conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            use_wal(conn, 5.0)
            answers.put(conn.execute("PRAGMA journal_mode").fetchone()[0])
        except sqlite3.Error as exc:
            answers.put(repr(exc))
        finally:
            conn.close()


@pytest.mark.slow
def test_two_processes_opening_a_new_file_at_once_both_get_wal(tmp_path: Path) -> None:
    barrier, answers = SPAWN.Barrier(2), SPAWN.Queue()
    queues = [SPAWN.Queue() for _ in range(2)]
    procs = [SPAWN.Process(target=_open_at_once, args=(q, barrier, answers)) for q in queues]
    for proc in procs:
        proc.start()
    try:
        got = []
        for n in range(ROUNDS):
            for q in queues:
                q.put(str(tmp_path / f"new-{n}.sqlite"))
            got += [answers.get(timeout=60) for _ in procs]
    finally:
        for q in queues:
            q.put(None)
        for proc in procs:
            proc.join(30)
    assert got == ["wal"] * 2 * ROUNDS


def test_a_database_in_memory_keeps_its_mode_at_once() -> None:
    conn = sqlite3.connect(":memory:")
    use_wal(conn, 30.0)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "memory"
