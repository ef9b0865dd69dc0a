"""A database made by an earlier release opens and gains the columns added since."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.core import JobSpec
from engine.store import JobStore


def test_old_jobs_table_gets_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    store = JobStore(f"sqlite:///{db}")
    store.create_job("old", JobSpec.parse({"problem": "sphere"}))
    store.close()
    with sqlite3.connect(db) as conn:  # as the first release wrote it: no cache_misses column
        conn.execute("ALTER TABLE jobs DROP COLUMN cache_misses")
    store = JobStore(f"sqlite:///{db}")
    try:
        assert store.get_job("old").cache_misses == 0
        assert [j.job_id for j in store.list_jobs()] == ["old"]
    finally:
        store.close()
