"""The store's tables. Rows never leave ``engine.store``: callers get the frozen values of ``job_store``.

JSON columns are plain text written by orjson (the same bytes on SQLite and PostgreSQL); times are
UTC. ``cycles`` and ``checkpoints`` reference ``jobs`` with ``ON DELETE CASCADE`` (SQLite enforces
it: the store turns ``PRAGMA foreign_keys`` on); ``evaluations`` does not, for speed.
:meth:`JobStore.delete_job` deletes the rows of all three explicitly.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, Table, Text
from sqlmodel import Field, SQLModel

__all__ = [
    "CheckpointRow",
    "CycleRow",
    "EvaluationRow",
    "JobRow",
    "CHECKPOINTS",
    "CYCLES",
    "EVALUATIONS",
    "JOBS",
    "STORE_TABLES",
]

_TS = DateTime(timezone=True)
# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; elsewhere the id may outgrow 32 bits.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


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


class EvaluationRow(SQLModel, table=True):
    """One evaluated candidate; ``position`` is its index within the cycle's batch."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_job_cycle", "job_id", "cycle"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ROW_ID)
    # No foreign key here: the per-row check cost PostgreSQL ~40% of a 5,000-row commit. Rows are
    # only written by JobStore.commit_cycle, in the transaction that updates (and locks) the job.
    job_id: str = Field(max_length=200)
    cycle: int
    position: int
    # Not indexed: look-ups by fingerprint go to the inference cache, and a random-key index made
    # commits of 5,000 evaluations grow from ~40 to ~100 ms as the table reached 500k rows.
    fingerprint: str = Field(max_length=32)
    params: str = Field(sa_type=Text)
    score: float | None = None
    status: str = Field(max_length=16)
    error: str | None = Field(default=None, sa_type=Text)
    duration: float = 0.0
    metrics: str | None = Field(default=None, sa_type=Text)


class CheckpointRow(SQLModel, table=True):
    """The latest checkpoint of a job (strategy state etc.); older ones are overwritten."""

    __tablename__ = "checkpoints"

    job_id: str = Field(primary_key=True, max_length=200, foreign_key="jobs.id", ondelete="CASCADE")
    cycle: int
    state: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=_TS)


JOBS: Table = SQLModel.metadata.tables["jobs"]
CYCLES: Table = SQLModel.metadata.tables["cycles"]
EVALUATIONS: Table = SQLModel.metadata.tables["evaluations"]
CHECKPOINTS: Table = SQLModel.metadata.tables["checkpoints"]

#: The tables :class:`~engine.store.JobStore` creates, parents first.
STORE_TABLES: tuple[Table, ...] = (JOBS, CYCLES, EVALUATIONS, CHECKPOINTS)
