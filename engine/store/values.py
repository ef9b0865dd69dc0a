"""The values the job store hands out, and its errors: frozen, free of ORM rows and of SQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from engine.core.candidate import Candidate
from engine.core.cycle import CycleRecord
from engine.core.errors import EngineError, TransientError
from engine.core.evaluation import Evaluation, Status
from engine.core.spec import JobSpec

__all__ = [
    "AnomalyLike",
    "Checkpoint",
    "JobRecord",
    "JobStatus",
    "StoreError",
    "StoreUnavailableError",
    "StoredAnomaly",
    "StoredCycle",
    "StoredEvaluation",
]


class StoreError(EngineError):
    """The database refused or failed an operation; the message says which, in one line."""


class StoreUnavailableError(StoreError, TransientError):
    """The database could not be reached or was busy; worth retrying."""


class JobStatus(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as stored: its spec, status and the summary of its committed cycles."""

    job_id: str
    spec: JobSpec
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None
    cycles: int
    evaluations: int
    failed_evaluations: int
    cached_evaluations: int
    cache_misses: int
    best_score: float | None
    best_candidate: dict[str, Any] | None
    stop_reason: str | None
    error: str | None
    flow_run_id: str | None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The latest checkpoint of a job: the state to resume from after ``cycle``."""

    job_id: str
    cycle: int
    state: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredCycle(CycleRecord):
    """A committed :class:`~engine.core.CycleRecord`, with when it finished and its metrics."""

    finished_at: datetime
    metrics: dict[str, Any] | None


class AnomalyLike(Protocol):
    """What :meth:`JobStore.add_anomalies` stores (``engine.observe.Finding`` is one)."""

    @property
    def kind(self) -> str: ...
    @property
    def cycle(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def evidence(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class StoredAnomaly:
    """An anomaly found in a job's cycles, as stored."""

    job_id: str
    cycle: int
    kind: str
    message: str
    evidence: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able values (the ``irefine status --json`` form)."""
        return {
            "cycle": self.cycle,
            "kind": self.kind,
            "message": self.message,
            "evidence": self.evidence,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class StoredEvaluation:
    """One stored evaluation; ``position`` is the candidate's index within its cycle."""

    cycle: int
    position: int
    fingerprint: str
    params: dict[str, Any]
    score: float | None
    status: Status
    error: str | None
    duration: float
    metrics: dict[str, Any]

    @property
    def candidate(self) -> Candidate:
        """The evaluated candidate."""
        return Candidate(self.params)

    @property
    def evaluation(self) -> Evaluation:
        """The evaluation as the engine produced it."""
        return Evaluation(self.score, self.status, dict(self.metrics), self.error, self.duration)
