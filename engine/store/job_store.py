"""The job store: jobs, their committed cycles and evaluations, and the latest checkpoint of each.

:class:`JobStore` talks SQL through SQLAlchemy Core; it hands out frozen values
(:class:`JobRecord`, :class:`StoredCycle`, :class:`StoredEvaluation`, :class:`Checkpoint`), never
ORM rows. A cycle is committed in one transaction (:meth:`JobStore.commit_cycle`): its evaluations,
its cycle row, the checkpoint and the job summary are all written, or none of them.

SQLite runs in WAL mode so that ``irefine status`` in another process reads while a job writes;
PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://``). Lag-tolerant reads go to the
replica when one is configured; reads that resume a job always go to the primary.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, Row, create_engine, delete, event, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlmodel import SQLModel

from engine.core.candidate import Candidate, canonical_json
from engine.core.cycle import CycleRecord, Progress
from engine.core.errors import EngineError, JobExistsError, JobNotFoundError, SpecError, TransientError
from engine.core.evaluation import Evaluation, Status
from engine.core.spec import JobSpec
from engine.store.tables import ANOMALIES, CHECKPOINTS, CYCLES, EVALUATION_BATCHES, JOBS, STORE_TABLES

if TYPE_CHECKING:
    from engine.settings import Settings

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
]

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
_RECORD_COLUMNS = tuple(f.name for f in fields(CycleRecord) if f.name in CYCLES.c)
"""The CycleRecord fields the cycles table keeps, each in a column of its name (written by
commit_cycle, read back by _stored_cycle). The derived evaluations_per_second is stored too, so
that SQL and dashboards can read it."""
_MAX_JOB_ID = 200
_SQLITE_BUSY_MS = 30_000
# Serialises CREATE TABLE across processes starting against a fresh PostgreSQL database.
_PG_SCHEMA_LOCK = 0x1EF1_0001


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


class JobStore:
    """Jobs, cycles, evaluations and checkpoints in SQLite or PostgreSQL.

    ``url`` is the primary (all writes, and reads that resume a job); ``replica_url``, if given,
    serves lag-tolerant reads. Creates the tables if missing. Thread-safe; close with :meth:`close`.
    """

    def __init__(self, url: str, replica_url: str | None = None) -> None:
        self._primary = _make_engine(url, "IRE_DATABASE_URL")
        try:
            self._replica = _make_engine(replica_url, "IRE_DATABASE_REPLICA_URL") if replica_url else None
            self._create_tables()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The store the settings name (``IRE_DATABASE_URL``, ``IRE_DATABASE_REPLICA_URL``)."""
        return cls(settings.resolved_database_url(), settings.database_replica_url)

    @property
    def url(self) -> str:
        """The primary URL, password hidden."""
        return self._primary.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close every pooled connection; the store must not be used afterwards."""
        for name in ("_primary", "_replica"):
            engine = getattr(self, name, None)
            if engine is not None:
                engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, job_id: str, spec: JobSpec) -> JobRecord:
        """Record a new pending job; raise :class:`JobExistsError` if the id is taken."""
        if not job_id or len(job_id) > _MAX_JOB_ID or job_id != job_id.strip():
            raise SpecError(f"job id {job_id!r}: use 1 to {_MAX_JOB_ID} characters, no surrounding spaces")
        now = _now()
        values: dict[str, Any] = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "status": JobStatus.PENDING.value,
            "created_at": now,
            "updated_at": now,
            "heartbeat_at": None,
            "cycles": 0,
            "evaluations": 0,
            "failed_evaluations": 0,
            "cached_evaluations": 0,
            "cache_misses": 0,
            "best_score": None,
            "best_candidate": None,
            "stop_reason": None,
            "error": None,
            "flow_run_id": None,
        }
        with self._errors(f"cannot create job {job_id!r}"):
            try:
                with self._primary.begin() as conn:
                    conn.execute(insert(JOBS), values)
            except IntegrityError:
                raise JobExistsError(
                    f"job {job_id!r} already exists: choose another --job-id or resume it"
                ) from None
        return JobRecord(
            job_id=job_id,
            spec=spec,
            status=JobStatus.PENDING,
            created_at=now,
            updated_at=now,
            heartbeat_at=None,
            cycles=0,
            evaluations=0,
            failed_evaluations=0,
            cached_evaluations=0,
            cache_misses=0,
            best_score=None,
            best_candidate=None,
            stop_reason=None,
            error=None,
            flow_run_id=None,
        )

    def get_job(self, job_id: str, *, fresh: bool = False) -> JobRecord:
        """The job ``job_id``, from the replica unless ``fresh``; raise :class:`JobNotFoundError`."""
        with self._errors(f"cannot read job {job_id!r}"), self._reader(fresh).connect() as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
        if row is None:
            raise _not_found(job_id)
        return _job_record(row)

    def list_jobs(self, limit: int = 50, *, fresh: bool = False) -> list[JobRecord]:
        """Up to ``limit`` jobs, newest first, from the replica unless ``fresh``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        stmt = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit)
        with self._errors("cannot list jobs"), self._reader(fresh).connect() as conn:
            rows = conn.execute(stmt).all()
        return [_job_record(row) for row in rows]

    def set_status(
        self,
        job_id: str,
        status: JobStatus | str,
        *,
        stop_reason: str | None = None,
        error: str | None = None,
        flow_run_id: str | None = None,
    ) -> None:
        """Set a job's status. ``None`` leaves a field as it is, except that moving to running
        clears the stop reason and error of an earlier run."""
        status = JobStatus(status)
        now = _now()
        values: dict[str, Any] = {"status": status.value, "updated_at": now}
        if status is JobStatus.RUNNING:
            values.update(stop_reason=None, error=None, heartbeat_at=now)
        if stop_reason is not None:
            values["stop_reason"] = stop_reason
        if error is not None:
            values["error"] = error
        if flow_run_id is not None:
            values["flow_run_id"] = flow_run_id
        self._update_job(job_id, values, f"cannot set the status of job {job_id!r}")

    def heartbeat(self, job_id: str) -> None:
        """Record that the job's runner is alive."""
        self._update_job(job_id, {"heartbeat_at": _now()}, f"cannot record a heartbeat of job {job_id!r}")

    def delete_job(self, job_id: str) -> None:
        """Delete the job and everything stored for it; raise :class:`JobNotFoundError` if absent."""
        with self._errors(f"cannot delete job {job_id!r}"), self._primary.begin() as conn:
            for table in (EVALUATION_BATCHES, CYCLES, CHECKPOINTS, ANOMALIES):
                conn.execute(delete(table).where(table.c.job_id == job_id))
            if conn.execute(delete(JOBS).where(JOBS.c.id == job_id)).rowcount == 0:
                raise _not_found(job_id)

    # -- cycles ---------------------------------------------------------------------------------

    def commit_cycle(
        self,
        job_id: str,
        record: CycleRecord,
        progress: Progress,
        candidates: Sequence[Candidate],
        evaluations: Sequence[Evaluation],
        checkpoint_state: dict[str, Any],
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Write one cycle in one transaction: its evaluations, its cycle row, the checkpoint to
        resume from and the job summary (from ``progress``). All of it is written or none.

        Raise :class:`StoreError` if the cycle is already committed, :class:`JobNotFoundError` if
        the job does not exist.
        """
        if len(candidates) != len(evaluations):
            raise ValueError(f"{len(candidates)} candidates but {len(evaluations)} evaluations")
        cycle = record.cycle
        # Serialise everything before the transaction opens, so that it holds its locks briefly.
        batch = {"job_id": job_id, "cycle": cycle, "count": len(candidates),
                 "data": _evaluation_batch(candidates, evaluations)}  # fmt: skip
        state_json = _dumps(checkpoint_state, "checkpoint state")
        metrics_json = None if metrics is None else _dumps(metrics, "cycle metrics")
        best_json = (
            None if progress.best_candidate is None else _dumps(progress.best_candidate, "best candidate")
        )
        now = _now()
        summary = {
            "cycles": progress.cycles,
            "evaluations": progress.evaluations,
            "failed_evaluations": progress.failed,
            "cached_evaluations": progress.cached,
            "cache_misses": progress.cache_misses,
            "best_score": progress.best_score,
            "best_candidate": best_json,
            "updated_at": now,
            "heartbeat_at": now,
        }
        cycle_row = {
            "job_id": job_id,
            "cycle": cycle,
            "finished_at": now,
            "metrics": metrics_json,
            "evaluations_per_second": record.evaluations_per_second,
            **{name: getattr(record, name) for name in _RECORD_COLUMNS},
        }
        with self._errors(f"cannot commit cycle {cycle} of job {job_id!r}"), self._primary.begin() as conn:
            # The summary first: it fails fast on a missing job and, on PostgreSQL, locks the job
            # row so that two writers of one job queue up instead of interleaving.
            if conn.execute(update(JOBS).where(JOBS.c.id == job_id), summary).rowcount == 0:
                raise _not_found(job_id)
            try:
                conn.execute(insert(CYCLES), cycle_row)
            except IntegrityError:
                raise StoreError(f"cycle {cycle} of job {job_id!r} is already committed") from None
            conn.execute(insert(EVALUATION_BATCHES), batch)
            self._upsert_checkpoint(conn, job_id, cycle, state_json, now)

    def last_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The job's latest checkpoint, read from the primary; ``None`` before its first cycle."""
        stmt = select(CHECKPOINTS).where(CHECKPOINTS.c.job_id == job_id)
        with self._errors(f"cannot read the checkpoint of job {job_id!r}"), self._primary.connect() as conn:
            row = conn.execute(stmt).one_or_none()
        if row is None:
            return None
        return Checkpoint(job_id, row.cycle, orjson.loads(row.state), _utc(row.created_at))

    def replace_checkpoint_state(self, job_id: str, cycle: int, state: dict[str, Any]) -> bool:
        """Overwrite the state of the job's checkpoint of ``cycle`` (re-signing it); False if the
        job has no checkpoint of that cycle any more (it moved on)."""
        state_json = _dumps(state, "checkpoint state")
        stmt = (
            update(CHECKPOINTS)
            .where(CHECKPOINTS.c.job_id == job_id, CHECKPOINTS.c.cycle == cycle)
            .values(state=state_json)
        )
        with self._errors(f"cannot write the checkpoint of job {job_id!r}"), self._primary.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def cycles(self, job_id: str, *, fresh: bool = False) -> list[StoredCycle]:
        """The job's committed cycles in order ([] for an unknown job), from the replica unless ``fresh``."""
        stmt = select(CYCLES).where(CYCLES.c.job_id == job_id).order_by(CYCLES.c.cycle)
        with self._errors(f"cannot read the cycles of job {job_id!r}"), self._reader(fresh).connect() as conn:
            rows = conn.execute(stmt).all()
        return [_stored_cycle(r) for r in rows]

    def last_cycle(self, job_id: str, *, fresh: bool = False) -> StoredCycle | None:
        """The job's last committed cycle (None before its first), from the replica unless ``fresh``."""
        stmt = select(CYCLES).where(CYCLES.c.job_id == job_id).order_by(CYCLES.c.cycle.desc()).limit(1)
        with self._errors(f"cannot read the cycles of job {job_id!r}"), self._reader(fresh).connect() as conn:
            row = conn.execute(stmt).one_or_none()
        return None if row is None else _stored_cycle(row)

    def evaluations(
        self, job_id: str, cycle: int | None = None, *, fresh: bool = False
    ) -> list[StoredEvaluation]:
        """The job's evaluations (of one cycle, or all) in commit order, from the replica unless ``fresh``."""
        t = EVALUATION_BATCHES
        stmt = select(t.c.cycle, t.c.data).where(t.c.job_id == job_id)
        if cycle is not None:
            stmt = stmt.where(t.c.cycle == cycle)
        stmt = stmt.order_by(t.c.cycle)
        with (
            self._errors(f"cannot read the evaluations of job {job_id!r}"),
            self._reader(fresh).connect() as conn,
        ):
            rows = conn.execute(stmt).all()
        return [ev for c, data in rows for ev in _stored_evaluations(c, data)]

    # -- anomalies ------------------------------------------------------------------------------

    def add_anomalies(self, job_id: str, anomalies: Sequence[AnomalyLike]) -> None:
        """Record anomalies found in the job's cycles; one already stored (same cycle and kind, as
        when a resumed job replays a cycle it had not committed) is left as it is."""
        if not anomalies:
            return
        now = _now()
        rows = [
            {
                "job_id": job_id,
                "cycle": a.cycle,
                "kind": a.kind,
                "message": a.message,
                "evidence": _dumps(a.evidence, f"the evidence of anomaly {a.kind!r}"),
                "created_at": now,
            }
            for a in anomalies
        ]
        keys = [ANOMALIES.c.job_id, ANOMALIES.c.cycle, ANOMALIES.c.kind]
        with self._errors(f"cannot record anomalies of job {job_id!r}"), self._primary.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(postgresql.insert(ANOMALIES).on_conflict_do_nothing(index_elements=keys), rows)
            else:
                conn.execute(sqlite.insert(ANOMALIES).on_conflict_do_nothing(index_elements=keys), rows)

    def anomalies(self, job_id: str, *, fresh: bool = False) -> list[StoredAnomaly]:
        """The job's anomalies by cycle ([] for an unknown job), from the replica unless ``fresh``."""
        t = ANOMALIES
        stmt = select(t).where(t.c.job_id == job_id).order_by(t.c.cycle, t.c.kind)
        with (
            self._errors(f"cannot read the anomalies of job {job_id!r}"),
            self._reader(fresh).connect() as conn,
        ):
            rows = conn.execute(stmt).all()
        return [
            StoredAnomaly(r.job_id, r.cycle, r.kind, r.message, orjson.loads(r.evidence), _utc(r.created_at))
            for r in rows
        ]

    # -- internals ------------------------------------------------------------------------------

    def _reader(self, fresh: bool) -> Engine:
        return self._primary if fresh or self._replica is None else self._replica

    def _create_tables(self) -> None:
        # On PostgreSQL an advisory lock serialises stores starting together on a fresh database;
        # SQLite DDL runs outside a transaction, so there a loser of that race just tries again.
        what = f"IRE_DATABASE_URL {self.url!r}: cannot create the tables"
        for attempt in range(3):
            try:
                with self._errors(what), self._primary.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
                    SQLModel.metadata.create_all(conn, tables=list(STORE_TABLES))
                    _add_missing_columns(conn)
                return
            except StoreError as exc:
                if attempt == 2 or "already exists" not in str(exc):
                    raise
                time.sleep(0.05)

    def _update_job(self, job_id: str, values: dict[str, Any], what: str) -> None:
        with self._errors(what), self._primary.begin() as conn:
            if conn.execute(update(JOBS).where(JOBS.c.id == job_id), values).rowcount == 0:
                raise _not_found(job_id)

    def _upsert_checkpoint(
        self, conn: Connection, job_id: str, cycle: int, state: str, now: datetime
    ) -> None:
        values = {"job_id": job_id, "cycle": cycle, "state": state, "created_at": now}
        if conn.dialect.name == "postgresql":
            pg = postgresql.insert(CHECKPOINTS).values(values)
            conn.execute(pg.on_conflict_do_update(index_elements=[CHECKPOINTS.c.job_id], set_=values))
        else:
            lite = sqlite.insert(CHECKPOINTS).values(values)
            conn.execute(lite.on_conflict_do_update(index_elements=[CHECKPOINTS.c.job_id], set_=values))

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn database exceptions into one-line :class:`StoreError` s prefixed with ``what``."""
        try:
            yield
        except EngineError:
            raise
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailableError(f"{what}: {_db_message(exc)}") from exc
        except DBAPIError as exc:
            cls = StoreUnavailableError if exc.connection_invalidated else StoreError
            raise cls(f"{what}: {_db_message(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"{what}: {_first_line(str(exc))}") from exc


# -- helpers --------------------------------------------------------------------------------------


def _stored_cycle(r: Row[Any]) -> StoredCycle:
    values = {name: getattr(r, name) for name in _RECORD_COLUMNS}
    return StoredCycle(
        **{**values, "improved": bool(r.improved)},
        finished_at=_utc(r.finished_at),
        metrics=None if r.metrics is None else orjson.loads(r.metrics),
    )


def _evaluation_batch(candidates: Sequence[Candidate], evaluations: Sequence[Evaluation]) -> bytes:
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


def _stored_evaluations(cycle: int, data: bytes) -> list[StoredEvaluation]:
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


def _make_engine(url: str, label: str) -> Engine:
    """An engine for ``url``; raise :class:`SpecError` naming ``label`` if the URL is unusable."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise SpecError(f"{label} {_redact(url)!r}: {_first_line(str(exc))}") from None
    shown = parsed.render_as_string(hide_password=True)
    backend, _, driver = parsed.drivername.partition("+")  # without loading the dialect
    kwargs: dict[str, Any] = {}
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise SpecError(
                f"{label} {shown!r}: driver {driver!r} is not supported; use postgresql+psycopg://"
            )
        parsed = parsed.set(drivername="postgresql+psycopg")  # also for plain postgresql://: no psycopg2
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": 10}
    elif backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise SpecError(f"{label} {shown!r}: driver {driver!r} is not supported; use sqlite:///PATH")
        _check_sqlite_path(parsed, label, shown)
        kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_MS / 1000}
        kwargs["pool_use_lifo"] = True  # reuse the connection whose page cache is warm
    else:
        raise SpecError(
            f"{label} {shown!r}: unsupported database {backend!r}; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, TypeError) as exc:
        raise SpecError(f"{label} {shown!r}: {_first_line(str(exc))}") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _check_sqlite_path(url: URL, label: str, shown: str) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).expanduser().resolve().parent
    if not folder.is_dir():
        raise SpecError(f"{label} {shown!r}: folder {str(folder)!r} does not exist")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers in other processes never block the writer nor wait for it. NORMAL: WAL commits
    # do not fsync (a power cut may lose the last commits, never corrupt the file). The random
    # fingerprint index dirties pages all over it each cycle: a 64 MiB page cache keeps them in
    # memory, and checkpointing every ~40 MiB of WAL rather than every 4 MiB copies each page to
    # the database file once per several cycles instead of once per cycle.
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.execute("PRAGMA journal_size_limit=67108864")
    finally:
        cur.close()


def _job_record(row: Row[Any]) -> JobRecord:
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
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        heartbeat_at=None if row.heartbeat_at is None else _utc(row.heartbeat_at),
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


def _not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(f"no job {job_id!r}: run `irefine list` to see job ids")


def _dumps(value: Any, what: str) -> str:
    try:
        return orjson.dumps(value, option=_JSON_OPTS).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _db_message(exc: DBAPIError) -> str:
    return _first_line(str(exc.orig) if exc.orig is not None else str(exc))


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _add_missing_columns(conn: Connection) -> None:
    """Bring a database made by an older release up to date: add the columns it lacks.

    Releases so far change the schema only by adding columns (counters with defaults), which
    ``ALTER TABLE ... ADD COLUMN`` covers on SQLite and PostgreSQL alike.
    """
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy.schema import CreateColumn

    inspector = sa_inspect(conn)
    for table in STORE_TABLES:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = str(CreateColumn(column).compile(dialect=conn.dialect)).replace(" NOT NULL", "")
            default = getattr(column.default, "arg", None)
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            clause = f" DEFAULT {default!r}" if number else ""
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}{clause}"))
