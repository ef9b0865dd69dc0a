"""The job store: jobs, their committed cycles and evaluations, and the latest checkpoint of each.

:class:`JobStore` talks SQL through SQLAlchemy Core; it hands out frozen values
(:class:`JobRecord`, :class:`StoredCycle`, :class:`StoredEvaluation`, :class:`Checkpoint`), never
ORM rows. A cycle is committed in one transaction (:meth:`JobStore.commit_cycle`): its evaluations,
its cycle row, the checkpoint and the job summary are all written, or none of them.

SQLite runs in WAL mode so that ``irefine status`` in another process reads while a job writes;
PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://``, multi-host URLs included, see
``engine.store.engines``). Jobs may be spread over several databases (shards): each job lives on
the shard its id hashes to, and everything stored for it lives there too. Lag-tolerant reads go
to the shard's replica when one is configured; reads that resume a job always go to the primary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import orjson
from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from engine.core.candidate import Candidate
from engine.core.cycle import CycleRecord, Progress
from engine.core.errors import JobExistsError, SpecError
from engine.core.evaluation import Evaluation
from engine.core.spec import JobSpec
from engine.store.codec import (
    RECORD_COLUMNS,
    dumps,
    evaluation_batch,
    job_record,
    not_found,
    now,
    stored_cycle,
    stored_evaluations,
    utc,
)
from engine.store.engines import RETRY_SECONDS, database_errors, make_engine, retry_transient
from engine.store.schema import DEFAULT_PARTITIONS, create_schema
from engine.store.tables import ANOMALIES, CHECKPOINTS, CYCLES, EVALUATION_BATCHES, JOBS
from engine.store.values import (
    AnomalyLike,
    Checkpoint,
    JobRecord,
    JobStatus,
    StoredAnomaly,
    StoredCycle,
    StoredEvaluation,
    StoreError,
)

if TYPE_CHECKING:
    from engine.settings import Settings

__all__ = ["JobStore", "shard_index"]

_MAX_JOB_ID = 200
P = ParamSpec("P")
R = TypeVar("R")


def _retried(method: Callable[P, R]) -> Callable[P, R]:
    """A store method that retries transient PostgreSQL errors (a restart, a promotion: refused or
    reset connections, a read-only session on a demoted primary) for the store's
    ``retry_seconds``, then raises :class:`StoreUnavailableError` saying so. Each retry runs the
    whole call again in a new transaction: a transaction either committed or did nothing."""

    @wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        store: JobStore = args[0]  # type: ignore[assignment]
        if store.retry_seconds <= 0 or not store._retries:
            return method(*args, **kwargs)
        return retry_transient(
            lambda: method(*args, **kwargs), seconds=store.retry_seconds, reset=store._drop_connections
        )

    return call


def shard_index(job_id: str, shard_count: int) -> int:
    """The shard (0-based) that holds ``job_id``: a stable hash of the id, the same in every process."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


@dataclass(frozen=True, slots=True)
class _Shard:
    """One database holding a share of the jobs: its primary and, if configured, a replica."""

    primary: Engine
    replica: Engine | None

    def reader(self, fresh: bool) -> Engine:
        return self.primary if fresh or self.replica is None else self.replica


class JobStore:
    """Jobs, cycles, evaluations and checkpoints in SQLite or PostgreSQL, on one or several shards.

    ``url`` is the primary (all writes, and reads that resume a job), or a sequence of the shards'
    primaries in shard order; ``replica_url`` (one per shard, ``None`` for none) serves lag-tolerant
    reads. Creates the tables if missing; on PostgreSQL the growing ones get ``partitions`` hash
    partitions (0: plain tables). Thread-safe; close with :meth:`close`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        replica_url: str | Sequence[str | None] | None = None,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        primaries = [url] if isinstance(url, str) else list(url)
        replicas = [replica_url] if replica_url is None or isinstance(replica_url, str) else list(replica_url)
        if not primaries:
            raise SpecError("IRE_DATABASE_SHARDS: list at least one database URL")
        if len(replicas) == 1 and len(primaries) > 1 and replicas[0] is None:
            replicas = [None] * len(primaries)
        if len(replicas) != len(primaries):
            raise SpecError(
                f"IRE_DATABASE_REPLICA_URL: {len(replicas)} replicas for {len(primaries)} shards; "
                "give one per shard or none"
            )
        if partitions < 0:
            raise SpecError(f"IRE_DATABASE_PARTITIONS={partitions}: use 0 (plain tables) or more")
        self._shards: list[_Shard] = []
        self.retry_seconds = retry_seconds
        try:
            for index, (primary, replica) in enumerate(zip(primaries, replicas, strict=True)):
                label, replica_label = _labels(index, len(primaries))
                shard = _Shard(
                    make_engine(primary, label), make_engine(replica, replica_label) if replica else None
                )
                self._shards.append(shard)
                create_schema(shard.primary, label, partitions=partitions, shard=index,
                              shard_count=len(primaries))  # fmt: skip
        except BaseException:
            self.close()
            raise
        # SQLite waits out a busy database itself (busy_timeout); PostgreSQL errors are retried.
        self._retries = any(s.primary.dialect.name == "postgresql" for s in self._shards)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The store the settings name (``IRE_DATABASE_URL`` or ``IRE_DATABASE_SHARDS``,
        ``IRE_DATABASE_REPLICA_URL``, ``IRE_DATABASE_PARTITIONS``, ``IRE_DATABASE_RETRY_SECONDS``)."""
        shards = settings.database_shard_urls()
        replicas = settings.database_replica_urls(len(shards))
        return cls(
            shards,
            replicas,
            partitions=settings.database_partitions,
            retry_seconds=settings.database_retry_seconds,
        )

    @property
    def url(self) -> str:
        """The primary URL (of the first shard), password hidden."""
        return self._shards[0].primary.url.render_as_string(hide_password=True)

    @property
    def shard_urls(self) -> list[str]:
        """The shards' primary URLs in shard order, passwords hidden."""
        return [s.primary.url.render_as_string(hide_password=True) for s in self._shards]

    def shard_of(self, job_id: str) -> int:
        """The shard (0-based index into :attr:`shard_urls`) that holds ``job_id``."""
        return shard_index(job_id, len(self._shards))

    def _drop_connections(self) -> None:
        """Forget pooled connections (before a retry): they may lead to a node that is gone or no
        longer the primary; new ones find the primary through the URL's host list."""
        for shard in self._shards:
            shard.primary.dispose()
            if shard.replica is not None:
                shard.replica.dispose()

    def close(self) -> None:
        """Close every pooled connection; the store must not be used afterwards."""
        for shard in getattr(self, "_shards", ()):
            shard.primary.dispose()
            if shard.replica is not None:
                shard.replica.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------------

    @_retried
    def create_job(self, job_id: str, spec: JobSpec) -> JobRecord:
        """Record a new pending job; raise :class:`JobExistsError` if the id is taken."""
        if not job_id or len(job_id) > _MAX_JOB_ID or job_id != job_id.strip():
            raise SpecError(f"job id {job_id!r}: use 1 to {_MAX_JOB_ID} characters, no surrounding spaces")
        created = now()
        record = JobRecord(
            job_id=job_id,
            spec=spec,
            status=JobStatus.PENDING,
            created_at=created,
            updated_at=created,
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
        values: dict[str, Any] = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "status": record.status.value,
            "created_at": created,
            "updated_at": created,
            **{name: getattr(record, name) for name in _NEW_JOB_COLUMNS},
        }
        with database_errors(f"cannot create job {job_id!r}"):
            try:
                with self._primary(job_id).begin() as conn:
                    conn.execute(insert(JOBS), values)
            except IntegrityError:
                raise JobExistsError(
                    f"job {job_id!r} already exists: choose another --job-id or resume it"
                ) from None
        return record

    @_retried
    def get_job(self, job_id: str, *, fresh: bool = False) -> JobRecord:
        """The job ``job_id``, from the replica unless ``fresh``; raise :class:`JobNotFoundError`."""
        with database_errors(f"cannot read job {job_id!r}"), self._reader(job_id, fresh).connect() as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
        if row is None:
            raise not_found(job_id)
        return job_record(row)

    @_retried
    def list_jobs(self, limit: int = 50, *, fresh: bool = False) -> list[JobRecord]:
        """Up to ``limit`` jobs of all shards, newest first, from the replicas unless ``fresh``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        stmt = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit)
        records: list[JobRecord] = []
        for shard in self._shards:
            with database_errors("cannot list jobs"), shard.reader(fresh).connect() as conn:
                records.extend(job_record(row) for row in conn.execute(stmt).all())
        if len(self._shards) > 1:
            records.sort(key=lambda r: (r.created_at, r.job_id), reverse=True)
        return records[:limit]

    @_retried
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
        updated = now()
        values: dict[str, Any] = {"status": status.value, "updated_at": updated}
        if status is JobStatus.RUNNING:
            values.update(stop_reason=None, error=None, heartbeat_at=updated)
        if stop_reason is not None:
            values["stop_reason"] = stop_reason
        if error is not None:
            values["error"] = error
        if flow_run_id is not None:
            values["flow_run_id"] = flow_run_id
        self._update_job(job_id, values, f"cannot set the status of job {job_id!r}")

    @_retried
    def heartbeat(self, job_id: str) -> None:
        """Record that the job's runner is alive."""
        self._update_job(job_id, {"heartbeat_at": now()}, f"cannot record a heartbeat of job {job_id!r}")

    @_retried
    def delete_job(self, job_id: str) -> None:
        """Delete the job and everything stored for it; raise :class:`JobNotFoundError` if absent."""
        with database_errors(f"cannot delete job {job_id!r}"), self._primary(job_id).begin() as conn:
            for table in (EVALUATION_BATCHES, CYCLES, CHECKPOINTS, ANOMALIES):
                conn.execute(delete(table).where(table.c.job_id == job_id))
            if conn.execute(delete(JOBS).where(JOBS.c.id == job_id)).rowcount == 0:
                raise not_found(job_id)

    # -- cycles ---------------------------------------------------------------------------------

    @_retried
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
                 "data": evaluation_batch(candidates, evaluations)}  # fmt: skip
        state_json = dumps(checkpoint_state, "checkpoint state")
        metrics_json = None if metrics is None else dumps(metrics, "cycle metrics")
        best_json = (
            None if progress.best_candidate is None else dumps(progress.best_candidate, "best candidate")
        )
        finished = now()
        summary = {
            "cycles": progress.cycles,
            "evaluations": progress.evaluations,
            "failed_evaluations": progress.failed,
            "cached_evaluations": progress.cached,
            "cache_misses": progress.cache_misses,
            "best_score": progress.best_score,
            "best_candidate": best_json,
            "updated_at": finished,
            "heartbeat_at": finished,
        }
        cycle_row = {
            "job_id": job_id,
            "cycle": cycle,
            "finished_at": finished,
            "metrics": metrics_json,
            "evaluations_per_second": record.evaluations_per_second,
            **{name: getattr(record, name) for name in RECORD_COLUMNS},
        }
        with (
            database_errors(f"cannot commit cycle {cycle} of job {job_id!r}"),
            self._primary(job_id).begin() as conn,
        ):
            # The summary first: it fails fast on a missing job and, on PostgreSQL, locks the job
            # row so that two writers of one job queue up instead of interleaving.
            if conn.execute(update(JOBS).where(JOBS.c.id == job_id), summary).rowcount == 0:
                raise not_found(job_id)
            try:
                conn.execute(insert(CYCLES), cycle_row)
            except IntegrityError:
                raise StoreError(f"cycle {cycle} of job {job_id!r} is already committed") from None
            conn.execute(insert(EVALUATION_BATCHES), batch)
            self._upsert_checkpoint(conn, job_id, cycle, state_json, finished)

    @_retried
    def last_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The job's latest checkpoint, read from the primary; ``None`` before its first cycle."""
        stmt = select(CHECKPOINTS).where(CHECKPOINTS.c.job_id == job_id)
        with (
            database_errors(f"cannot read the checkpoint of job {job_id!r}"),
            self._primary(job_id).connect() as conn,
        ):
            row = conn.execute(stmt).one_or_none()
        if row is None:
            return None
        return Checkpoint(job_id, row.cycle, orjson.loads(row.state), utc(row.created_at))

    @_retried
    def replace_checkpoint_state(self, job_id: str, cycle: int, state: dict[str, Any]) -> bool:
        """Overwrite the state of the job's checkpoint of ``cycle`` (re-signing it); False if the
        job has no checkpoint of that cycle any more (it moved on)."""
        state_json = dumps(state, "checkpoint state")
        stmt = (
            update(CHECKPOINTS)
            .where(CHECKPOINTS.c.job_id == job_id, CHECKPOINTS.c.cycle == cycle)
            .values(state=state_json)
        )
        with (
            database_errors(f"cannot write the checkpoint of job {job_id!r}"),
            self._primary(job_id).begin() as conn,
        ):
            return bool(conn.execute(stmt).rowcount)

    @_retried
    def cycles(self, job_id: str, *, fresh: bool = False) -> list[StoredCycle]:
        """The job's committed cycles in order ([] for an unknown job), from the replica unless ``fresh``."""
        stmt = select(CYCLES).where(CYCLES.c.job_id == job_id).order_by(CYCLES.c.cycle)
        with (
            database_errors(f"cannot read the cycles of job {job_id!r}"),
            self._reader(job_id, fresh).connect() as conn,
        ):
            rows = conn.execute(stmt).all()
        return [stored_cycle(r) for r in rows]

    @_retried
    def last_cycle(self, job_id: str, *, fresh: bool = False) -> StoredCycle | None:
        """The job's last committed cycle (None before its first), from the replica unless ``fresh``."""
        stmt = select(CYCLES).where(CYCLES.c.job_id == job_id).order_by(CYCLES.c.cycle.desc()).limit(1)
        with (
            database_errors(f"cannot read the cycles of job {job_id!r}"),
            self._reader(job_id, fresh).connect() as conn,
        ):
            row = conn.execute(stmt).one_or_none()
        return None if row is None else stored_cycle(row)

    @_retried
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
            database_errors(f"cannot read the evaluations of job {job_id!r}"),
            self._reader(job_id, fresh).connect() as conn,
        ):
            rows = conn.execute(stmt).all()
        return [ev for c, data in rows for ev in stored_evaluations(c, data)]

    # -- anomalies ------------------------------------------------------------------------------

    @_retried
    def add_anomalies(self, job_id: str, anomalies: Sequence[AnomalyLike]) -> None:
        """Record anomalies found in the job's cycles; one already stored (same cycle and kind, as
        when a resumed job replays a cycle it had not committed) is left as it is."""
        if not anomalies:
            return
        found = now()
        rows = [
            {
                "job_id": job_id,
                "cycle": a.cycle,
                "kind": a.kind,
                "message": a.message,
                "evidence": dumps(a.evidence, f"the evidence of anomaly {a.kind!r}"),
                "created_at": found,
            }
            for a in anomalies
        ]
        keys = [ANOMALIES.c.job_id, ANOMALIES.c.cycle, ANOMALIES.c.kind]
        with (
            database_errors(f"cannot record anomalies of job {job_id!r}"),
            self._primary(job_id).begin() as conn,
        ):
            if conn.dialect.name == "postgresql":
                conn.execute(postgresql.insert(ANOMALIES).on_conflict_do_nothing(index_elements=keys), rows)
            else:
                conn.execute(sqlite.insert(ANOMALIES).on_conflict_do_nothing(index_elements=keys), rows)

    @_retried
    def anomalies(self, job_id: str, *, fresh: bool = False) -> list[StoredAnomaly]:
        """The job's anomalies by cycle ([] for an unknown job), from the replica unless ``fresh``."""
        t = ANOMALIES
        stmt = select(t).where(t.c.job_id == job_id).order_by(t.c.cycle, t.c.kind)
        with (
            database_errors(f"cannot read the anomalies of job {job_id!r}"),
            self._reader(job_id, fresh).connect() as conn,
        ):
            rows = conn.execute(stmt).all()
        return [
            StoredAnomaly(r.job_id, r.cycle, r.kind, r.message, orjson.loads(r.evidence), utc(r.created_at))
            for r in rows
        ]

    # -- internals ------------------------------------------------------------------------------

    def _primary(self, job_id: str) -> Engine:
        return self._shards[self.shard_of(job_id)].primary

    def _reader(self, job_id: str, fresh: bool) -> Engine:
        return self._shards[self.shard_of(job_id)].reader(fresh)

    def _update_job(self, job_id: str, values: dict[str, Any], what: str) -> None:
        with database_errors(what), self._primary(job_id).begin() as conn:
            if conn.execute(update(JOBS).where(JOBS.c.id == job_id), values).rowcount == 0:
                raise not_found(job_id)

    def _upsert_checkpoint(
        self, conn: Connection, job_id: str, cycle: int, state: str, created: datetime
    ) -> None:
        values = {"job_id": job_id, "cycle": cycle, "state": state, "created_at": created}
        if conn.dialect.name == "postgresql":
            pg = postgresql.insert(CHECKPOINTS).values(values)
            conn.execute(pg.on_conflict_do_update(index_elements=[CHECKPOINTS.c.job_id], set_=values))
        else:
            lite = sqlite.insert(CHECKPOINTS).values(values)
            conn.execute(lite.on_conflict_do_update(index_elements=[CHECKPOINTS.c.job_id], set_=values))


# The columns of a new job that start empty or at zero (JobRecord fields of the same name).
_NEW_JOB_COLUMNS = (
    "heartbeat_at", "cycles", "evaluations", "failed_evaluations", "cached_evaluations", "cache_misses",
    "best_score", "best_candidate", "stop_reason", "error", "flow_run_id",
)  # fmt: skip


def _labels(index: int, shard_count: int) -> tuple[str, str]:
    """How errors name a shard's primary and replica URLs: by the setting they come from."""
    if shard_count == 1:
        return "IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL"
    return f"IRE_DATABASE_SHARDS[{index}]", f"IRE_DATABASE_REPLICA_URL[{index}]"
