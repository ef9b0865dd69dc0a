"""Persistence of jobs, cycles, evaluations and checkpoints (SQLite or PostgreSQL, one or more shards).

Only frozen values leave this package; the ORM rows of ``engine.store.tables`` stay inside.
"""

from engine.store.job_store import JobStore, shard_index
from engine.store.values import (
    AnomalyLike,
    Checkpoint,
    JobRecord,
    JobStatus,
    StoredAnomaly,
    StoredCycle,
    StoredEvaluation,
    StoreError,
    StoreUnavailableError,
)

__all__ = [
    "AnomalyLike",
    "Checkpoint",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "StoreError",
    "StoreUnavailableError",
    "StoredAnomaly",
    "StoredCycle",
    "StoredEvaluation",
    "shard_index",
]
