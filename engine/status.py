"""A job's status as one typed, JSON-able object: what ``irefine status --json`` prints and what
the ``refine`` flow returns (the same fields, the same JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.store import JobRecord, JobStore, StoredCycle

__all__ = ["JobStatusReport", "cycle_metrics", "job_summary"]


def job_summary(record: JobRecord) -> dict[str, Any]:
    """The status of a job as one JSON-able dict (``irefine list --json`` prints a list of these)."""
    return {
        "job_id": record.job_id,
        "status": record.status.value,
        "cycles": record.cycles,
        "evaluations": record.evaluations,
        "failed_evaluations": record.failed_evaluations,
        "cached_evaluations": record.cached_evaluations,
        "cache_hits": record.cached_evaluations,
        "cache_misses": record.cache_misses,
        "best_score": record.best_score,
        "best_candidate": record.best_candidate,
        "stop_reason": record.stop_reason,
        "error": record.error,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "problem": record.spec.problem,
        "strategy": record.spec.strategy,
        "spec": record.spec.model_dump(mode="json"),
    }


def cycle_metrics(cycle: StoredCycle | None) -> dict[str, Any] | None:
    """The measurements of a stored cycle (the status "metrics" object); None before one."""
    if cycle is None:
        return None
    return {
        "cycle": cycle.cycle,
        "duration_seconds": cycle.duration,
        "evaluations_per_second": cycle.evaluations_per_second,
        "eval_p50_seconds": cycle.eval_p50,
        "eval_p95_seconds": cycle.eval_p95,
        "eval_max_seconds": cycle.eval_max,
        "process_cpu_percent": cycle.process_cpu_percent,
        "process_rss_bytes": cycle.process_rss_bytes,
        "worker_memory_total_bytes": cycle.worker_memory_total_bytes,
        "worker_memory_max_bytes": cycle.worker_memory_max_bytes,
    }


class JobStatusReport(BaseModel):
    """A job as stored: its totals, best candidate, last cycle's metrics and anomalies.
    ``model_dump(mode="json")`` is exactly the object ``irefine status --json`` prints."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: str
    cycles: int
    evaluations: int
    failed_evaluations: int
    cached_evaluations: int
    cache_hits: int
    cache_misses: int
    best_score: float | None
    best_candidate: dict[str, Any] | None
    stop_reason: str | None
    error: str | None
    created_at: str
    updated_at: str
    problem: str
    strategy: str
    spec: dict[str, Any]
    metrics: dict[str, Any] | None
    anomalies: list[dict[str, Any]]

    @classmethod
    def read(cls, store: JobStore, job_id: str, *, fresh: bool = False) -> JobStatusReport:
        """The job's status as ``store`` has it (``fresh``: from the primary, not a replica)."""
        record = store.get_job(job_id, fresh=fresh)
        return cls(
            **job_summary(record),
            metrics=cycle_metrics(store.last_cycle(job_id, fresh=fresh)),
            anomalies=[a.to_dict() for a in store.anomalies(job_id, fresh=fresh)],
        )
