"""Persistence of jobs, cycles, evaluations and checkpoints (SQLite or PostgreSQL).

Only frozen values leave this package; the ORM rows of ``engine.store.tables`` stay inside.
"""

from engine.store.job_store import (
    Checkpoint,
    JobRecord,
    JobStatus,
    JobStore,
    StoredCycle,
    StoredEvaluation,
    StoreError,
    StoreUnavailableError,
)

__all__ = [
    "Checkpoint",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "StoreError",
    "StoreUnavailableError",
    "StoredCycle",
    "StoredEvaluation",
]
