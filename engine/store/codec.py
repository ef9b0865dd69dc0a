"""Between the store's rows and its values: JSON columns, times in UTC, rows to frozen values."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import Row

from engine.core.candidate import Candidate, canonical_json
from engine.core.cycle import CycleRecord
from engine.core.errors import JobNotFoundError
from engine.core.evaluation import Evaluation, Status
from engine.core.spec import JobSpec
from engine.store.tables import CYCLES
from engine.store.values import JobRecord, JobStatus, StoredCycle, StoredEvaluation, StoreError

__all__ = [
    "RECORD_COLUMNS",
    "dumps",
    "evaluation_batch",
    "job_record",
    "not_found",
    "now",
    "stored_cycle",
    "stored_evaluations",
    "utc",
]

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
RECORD_COLUMNS = tuple(f.name for f in fields(CycleRecord) if f.name in CYCLES.c)
"""The CycleRecord fields the cycles table keeps, each in a column of its name (written by
commit_cycle, read back by stored_cycle). The derived evaluations_per_second is stored too, so
that SQL and dashboards can read it."""


def stored_cycle(r: Row[Any]) -> StoredCycle:
    """A cycles row as a :class:`StoredCycle`."""
    values = {name: getattr(r, name) for name in RECORD_COLUMNS}
    return StoredCycle(
        **{**values, "improved": bool(r.improved)},
        finished_at=utc(r.finished_at),
        metrics=None if r.metrics is None else orjson.loads(r.metrics),
    )


def evaluation_batch(candidates: Sequence[Candidate], evaluations: Sequence[Evaluation]) -> bytes:
    """A cycle's evaluations as one JSON document of columns (see ``EvaluationBatchRow``)."""
    return orjson.dumps(
        {
            "v": 1,
            "params": candidates,
            "score": [None if ev.score is None else float(ev.score) for ev in evaluations],
            "status": [ev.status.value for ev in evaluations],
            "error": [ev.error for ev in evaluations],
            "duration": [ev.duration for ev in evaluations],
            "metrics": [ev.metrics for ev in evaluations],
        },
        option=_JSON_OPTS,
    )


def stored_evaluations(cycle: int, data: bytes) -> list[StoredEvaluation]:
    """Decode one cycle's batch; fingerprints are computed as ``engine.core.fingerprint`` does."""
    doc = orjson.loads(data)
    blake2b = hashlib.blake2b
    columns = zip(doc["params"], doc["score"], doc["status"], doc["error"], doc["duration"], doc["metrics"],
                  strict=True)  # fmt: skip
    return [
        StoredEvaluation(
            cycle=cycle, position=i, fingerprint=blake2b(canonical_json(params), digest_size=16).hexdigest(),
            params=params, score=score, status=Status(status), error=error, duration=duration,
            metrics=metrics or {},
        )
        for i, (params, score, status, error, duration, metrics) in enumerate(columns)
    ]  # fmt: skip


def job_record(row: Row[Any]) -> JobRecord:
    """A jobs row as a :class:`JobRecord`; a spec this version cannot read raises :class:`StoreError`."""
    try:
        spec = JobSpec.model_validate_json(row.spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise StoreError(
            f"job {row.id!r} has a stored spec this version cannot read: {where}: {err['msg']}"
        ) from None
    return JobRecord(
        job_id=row.id,
        spec=spec,
        status=JobStatus(row.status),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        heartbeat_at=None if row.heartbeat_at is None else utc(row.heartbeat_at),
        cycles=row.cycles,
        evaluations=row.evaluations,
        failed_evaluations=row.failed_evaluations,
        cached_evaluations=row.cached_evaluations,
        cache_misses=row.cache_misses,
        best_score=row.best_score,
        best_candidate=None if row.best_candidate is None else orjson.loads(row.best_candidate),
        stop_reason=row.stop_reason,
        error=row.error,
        flow_run_id=row.flow_run_id,
    )


def not_found(job_id: str) -> JobNotFoundError:
    """The error for an unknown job id."""
    return JobNotFoundError(f"no job {job_id!r}: run `irefine list` to see job ids")


def dumps(value: Any, what: str) -> str:
    """``value`` as JSON text; raise :class:`TypeError` naming ``what`` if it is not JSON-able."""
    try:
        return orjson.dumps(value, option=_JSON_OPTS).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


def utc(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime."""
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
