"""The store's tables. Rows never leave ``engine.store``: callers get the frozen values of ``job_store``.

JSON columns are plain text written by orjson (the same bytes on SQLite and PostgreSQL); times are
UTC. ``cycles``, ``evaluation_batches``, ``checkpoints`` and ``anomalies`` reference ``jobs`` with
``ON DELETE CASCADE`` (SQLite enforces it: the store turns ``PRAGMA foreign_keys`` on);
:meth:`JobStore.delete_job` also deletes their rows explicitly. On PostgreSQL the growing tables
(``PARTITIONED_TABLES``) are hash-partitioned by ``job_id`` (``engine.store.schema``); their
primary keys start with it, as partitioning requires.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, LargeBinary, Table, Text
from sqlmodel import Field, SQLModel

__all__ = [
    "AnomalyRow",
    "CheckpointRow",
    "CycleRow",
    "EvaluationBatchRow",
    "JobRow",
    "ShardRow",
    "ANOMALIES",
    "CHECKPOINTS",
    "CYCLES",
    "EVALUATION_BATCHES",
    "JOBS",
    "PARTITIONED_TABLES",
    "SHARD",
    "STORE_TABLES",
]

_TS = DateTime(timezone=True)


class JobRow(SQLModel, table=True):
    """One refinement job and the summary of its committed cycles."""

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=200)
    spec: str = Field(sa_type=Text)
    status: str = Field(max_length=16)
    created_at: datetime = Field(sa_type=_TS, index=True)
    updated_at: datetime = Field(sa_type=_TS)
    heartbeat_at: datetime | None = Field(default=None, sa_type=_TS)
    cycles: int = 0
    evaluations: int = 0
    failed_evaluations: int = 0
    cached_evaluations: int = 0
    cache_misses: int = 0
    best_score: float | None = None
    best_candidate: str | None = Field(default=None, sa_type=Text)
    stop_reason: str | None = Field(default=None, sa_type=Text)
    error: str | None = Field(default=None, sa_type=Text)
    flow_run_id: str | None = Field(default=None, max_length=64)


class CycleRow(SQLModel, table=True):
    """One committed cycle of a job: its counts and the job's best after it."""

    __tablename__ = "cycles"

    job_id: str = Field(primary_key=True, max_length=200, foreign_key="jobs.id", ondelete="CASCADE")
    cycle: int = Field(primary_key=True)
    finished_at: datetime = Field(sa_type=_TS)
    duration: float
    evaluations: int
    failed: int
    cached: int
    batch_best_score: float | None = None
    best_score: float | None = None
    improved: bool
    eval_seconds: float
    metrics: str | None = Field(default=None, sa_type=Text)
    # Measured per cycle (null when not measured): evaluation latency in seconds, throughput,
    # the loop process's CPU (100 = one core) and resident memory, and the workers' memory.
    eval_p50: float | None = None
    eval_p95: float | None = None
    eval_max: float | None = None
    evaluations_per_second: float | None = None
    process_cpu_percent: float | None = None
    process_rss_bytes: int | None = Field(default=None, sa_type=BigInteger)
    worker_memory_total_bytes: int | None = Field(default=None, sa_type=BigInteger)
    worker_memory_max_bytes: int | None = Field(default=None, sa_type=BigInteger)


class EvaluationBatchRow(SQLModel, table=True):
    """A cycle's evaluations as one JSON document of columns (``params``, ``score``, ``status``,
    ``error``, ``duration``, ``metrics``, each a list in candidate order).

    One row a cycle rather than one an evaluation: 5,000 cheap evaluations then cost one ~5 ms
    serialisation on the flow process, where rows cost ~35 ms of per-row work that competed with
    the Dask client for the GIL (bench/overhead.py). Fingerprints are derived when read.
    """

    __tablename__ = "evaluation_batches"

    job_id: str = Field(primary_key=True, max_length=200, foreign_key="jobs.id", ondelete="CASCADE")
    cycle: int = Field(primary_key=True)
    count: int
    data: bytes = Field(sa_type=LargeBinary)


class CheckpointRow(SQLModel, table=True):
    """The latest checkpoint of a job (strategy state etc.); older ones are overwritten."""

    __tablename__ = "checkpoints"

    job_id: str = Field(primary_key=True, max_length=200, foreign_key="jobs.id", ondelete="CASCADE")
    cycle: int
    state: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=_TS)


class AnomalyRow(SQLModel, table=True):
    """An anomaly episode found in a job's cycles (``engine.observe.anomaly``); one per cycle and kind."""

    __tablename__ = "anomalies"

    job_id: str = Field(primary_key=True, max_length=200, foreign_key="jobs.id", ondelete="CASCADE")
    cycle: int = Field(primary_key=True)
    kind: str = Field(primary_key=True, max_length=40)
    message: str = Field(sa_type=Text)
    evidence: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=_TS)


class ShardRow(SQLModel, table=True):
    """Which shard of how many this database is (one row): jobs are placed by a hash of their id
    over the shard count, so a database must not be listed in another place or in a longer list."""

    __tablename__ = "store_shard"

    id: int = Field(default=1, primary_key=True)
    shard: int
    shard_count: int


JOBS: Table = SQLModel.metadata.tables["jobs"]
CYCLES: Table = SQLModel.metadata.tables["cycles"]
EVALUATION_BATCHES: Table = SQLModel.metadata.tables["evaluation_batches"]
CHECKPOINTS: Table = SQLModel.metadata.tables["checkpoints"]
ANOMALIES: Table = SQLModel.metadata.tables["anomalies"]
SHARD: Table = SQLModel.metadata.tables["store_shard"]

#: The tables :class:`~engine.store.JobStore` creates, parents first.
STORE_TABLES: tuple[Table, ...] = (JOBS, CYCLES, EVALUATION_BATCHES, CHECKPOINTS, ANOMALIES, SHARD)
#: The tables that grow with every cycle: hash-partitioned by ``job_id`` on PostgreSQL.
PARTITIONED_TABLES: tuple[Table, ...] = (CYCLES, EVALUATION_BATCHES, ANOMALIES)
