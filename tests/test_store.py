"""The job store's contract, run against SQLite and a real PostgreSQL alike."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import engine.store.job_store as job_store_module
from engine.core import (
    Candidate,
    Evaluation,
    JobExistsError,
    JobNotFoundError,
    JobSpec,
    Progress,
    SpecError,
    Status,
    TransientError,
    account_cycle,
    fingerprint,
)
from engine.settings import Settings
from engine.store import JobStatus, JobStore, StoreError, StoreUnavailableError
from tests.services import PostgresServer, RedisServer, free_port

SPEC = JobSpec(problem="sphere", batch_size=4, max_evaluations=100, seed=7)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _fresh_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / name}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str) -> str:
    return str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url"))


@pytest.fixture
def other_db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A second, separate database of the same backend."""
    return _fresh_url(request, backend, tmp_path, "other.db")


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    with JobStore(db_url) as s:
        yield s


def make_cycle(
    progress: Progress, cycle_seed: int, n: int = 4
) -> tuple[Progress, Any, list[Candidate], list[Evaluation]]:
    """A cycle of ``n`` candidates: mostly ok, one failed, one cached, some with metrics."""
    rng = np.random.default_rng(cycle_seed)
    candidates = [
        Candidate({"x": float(rng.uniform(-5, 5)), "n": int(rng.integers(0, 9)), "kind": "ab"[i % 2]})
        for i in range(n)
    ]
    evaluations: list[Evaluation] = []
    for i, c in enumerate(candidates):
        if i == 1:
            evaluations.append(Evaluation.failed("boom: division by zero", duration=0.01))
        elif i == 2:
            evaluations.append(Evaluation(c["x"] ** 2, Status.CACHED, {}, None, 0.0))
        else:
            evaluations.append(
                Evaluation(c["x"] ** 2, metrics={"iters": i, "trace": [1.5, 2.5]}, duration=0.1 * i)
            )
    new, record = account_cycle(
        progress, candidates, evaluations, maximize=False, tolerance=0.0, duration=0.5
    )
    return new, record, candidates, evaluations


def commit(store: JobStore, job_id: str, progress: Progress, seed: int, **kw: Any) -> Progress:
    new, record, cands, evs = make_cycle(progress, seed)
    state = {"progress": new.to_dict(), "mean": np.array([0.5, 1.5]), "cycle": new.cycles}
    store.commit_cycle(job_id, record, new, cands, evs, state, **kw)
    return new


def snapshot(store: JobStore, job_id: str) -> tuple[Any, ...]:
    return (
        store.get_job(job_id, fresh=True),
        store.cycles(job_id, fresh=True),
        store.evaluations(job_id, fresh=True),
        store.last_checkpoint(job_id),
    )


# -- jobs -------------------------------------------------------------------------------------------


def test_create_get_list(store: JobStore) -> None:
    a = store.create_job("job-a", SPEC)
    time.sleep(0.002)
    b = store.create_job("job-b", SPEC.model_copy(update={"seed": 8}))
    assert a.status is JobStatus.PENDING and a.cycles == 0 and a.best_candidate is None
    assert a.created_at.tzinfo is not None and a.created_at.utcoffset() == UTC.utcoffset(None)

    got = store.get_job("job-a")
    assert got == a
    assert got.spec == SPEC and isinstance(got.spec, JobSpec)
    assert [j.job_id for j in store.list_jobs()] == ["job-b", "job-a"]
    assert [j.job_id for j in store.list_jobs(limit=1)] == ["job-b"]
    assert store.list_jobs()[0] == b
    with pytest.raises(ValueError):
        store.list_jobs(limit=0)


def test_duplicate_job_id_raises(store: JobStore) -> None:
    store.create_job("dup", SPEC)
    store.set_status("dup", JobStatus.RUNNING)
    with pytest.raises(
        JobExistsError, match="job 'dup' already exists: choose another --job-id or resume it"
    ):
        store.create_job("dup", SPEC.model_copy(update={"seed": 99}))
    kept = store.get_job("dup")
    assert kept.spec == SPEC and kept.status is JobStatus.RUNNING


def test_concurrent_create_exactly_one_wins(store: JobStore) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        try:
            store.create_job("race", SPEC)
            outcomes.append("created")
        except JobExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["exists"] * 5


def test_missing_job(store: JobStore) -> None:
    message = r"no job 'ghost': run `irefine list` to see job ids"
    with pytest.raises(JobNotFoundError, match=message):
        store.get_job("ghost")
    with pytest.raises(JobNotFoundError, match=message):
        store.set_status("ghost", JobStatus.RUNNING)
    with pytest.raises(JobNotFoundError, match=message):
        store.heartbeat("ghost")
    with pytest.raises(JobNotFoundError, match=message):
        store.delete_job("ghost")
    with pytest.raises(JobNotFoundError, match=message):
        commit(store, "ghost", Progress(), 1)
    assert store.last_checkpoint("ghost") is None
    assert store.cycles("ghost") == [] and store.evaluations("ghost") == []


def test_bad_job_id(store: JobStore) -> None:
    for bad in ("", " padded ", "x" * 201):
        with pytest.raises(SpecError, match="job id"):
            store.create_job(bad, SPEC)


def test_set_status_and_heartbeat(store: JobStore) -> None:
    created = store.create_job("j", SPEC)
    store.set_status("j", JobStatus.RUNNING, flow_run_id="run-1")
    running = store.get_job("j")
    assert running.status is JobStatus.RUNNING and running.flow_run_id == "run-1"
    assert running.heartbeat_at is not None and running.updated_at >= created.updated_at

    time.sleep(0.002)
    store.heartbeat("j")
    assert store.get_job("j").heartbeat_at > running.heartbeat_at  # type: ignore[operator]

    store.set_status("j", "failed", error="worker lost")
    failed = store.get_job("j")
    assert (
        failed.status is JobStatus.FAILED and failed.error == "worker lost" and failed.flow_run_id == "run-1"
    )

    # A new run starts clean: the earlier error and stop reason go.
    store.set_status("j", JobStatus.RUNNING, flow_run_id="run-2")
    resumed = store.get_job("j")
    assert resumed.error is None and resumed.stop_reason is None and resumed.flow_run_id == "run-2"

    store.set_status("j", JobStatus.COMPLETED, stop_reason="max cycles reached (3)")
    done = store.get_job("j")
    assert done.status is JobStatus.COMPLETED and done.stop_reason == "max cycles reached (3)"
    with pytest.raises(ValueError):
        store.set_status("j", "exploded")


def test_delete_job(store: JobStore) -> None:
    store.create_job("gone", SPEC)
    store.create_job("kept", SPEC)
    commit(store, "gone", Progress(), 1)
    kept_progress = commit(store, "kept", Progress(), 2)
    before = snapshot(store, "kept")

    store.delete_job("gone")
    with pytest.raises(JobNotFoundError):
        store.get_job("gone")
    assert store.cycles("gone") == [] and store.evaluations("gone") == []
    assert store.last_checkpoint("gone") is None
    assert snapshot(store, "kept") == before and kept_progress.cycles == 1

    recreated = store.create_job("gone", SPEC)  # the id is free again, with no leftovers
    assert recreated.cycles == 0 and store.last_checkpoint("gone") is None


# -- cycles -------------------------------------------------------------------------------------------


def test_commit_cycle_round_trip(store: JobStore) -> None:
    store.create_job("j", SPEC)
    p1, r1, c1, e1 = make_cycle(Progress(), 1)
    store.commit_cycle(
        "j", r1, p1, c1, e1, {"progress": p1.to_dict(), "mean": np.array([0.5, 1.5])}, {"gpu": 0.5}
    )
    p2, r2, c2, e2 = make_cycle(p1, 2)
    store.commit_cycle("j", r2, p2, c2, e2, {"progress": p2.to_dict(), "mean": [2.5]})

    job = store.get_job("j")
    assert (job.cycles, job.evaluations, job.failed_evaluations, job.cached_evaluations) == (
        2, p2.evaluations, p2.failed, p2.cached,
    )  # fmt: skip
    assert job.evaluations == 8 and job.failed_evaluations == 2 and job.cached_evaluations == 2
    assert job.best_score == p2.best_score and job.best_candidate == p2.best_candidate
    assert job.heartbeat_at is not None

    cycles = store.cycles("j")
    assert [c.cycle for c in cycles] == [1, 2]
    for stored, record in zip(cycles, (r1, r2), strict=True):
        fields = ("cycle", "evaluations", "failed", "cached", "batch_best_score", "best_score", "improved")
        for field in (*fields, "duration", "eval_seconds"):
            assert getattr(stored, field) == getattr(record, field), field
        assert stored.finished_at.tzinfo is not None
    assert cycles[0].metrics == {"gpu": 0.5} and cycles[1].metrics is None
    assert cycles[0].failure_share == r1.failure_share

    evaluations = store.evaluations("j")
    assert [(e.cycle, e.position) for e in evaluations] == [(c, i) for c in (1, 2) for i in range(4)]
    for got, cand, ev in zip(evaluations, c1 + c2, e1 + e2, strict=True):
        assert got.params == dict(cand) and got.candidate == cand
        assert got.fingerprint == fingerprint(cand)
        assert got.evaluation == ev
        assert got.status is ev.status and got.score == ev.score and got.error == ev.error
    assert evaluations[1].status is Status.FAILED and evaluations[1].error == "boom: division by zero"
    assert evaluations[0].metrics == {"iters": 0, "trace": [1.5, 2.5]}
    assert [e.position for e in store.evaluations("j", cycle=2)] == [0, 1, 2, 3]
    assert store.evaluations("j", cycle=3) == []

    checkpoint = store.last_checkpoint("j")
    assert checkpoint is not None and checkpoint.job_id == "j" and checkpoint.cycle == 2
    assert checkpoint.state == {"progress": p2.to_dict(), "mean": [2.5]}
    assert Progress.from_dict(checkpoint.state["progress"]) == p2


def test_last_checkpoint_is_the_newest(store: JobStore) -> None:
    store.create_job("j", SPEC)
    assert store.last_checkpoint("j") is None
    progress = Progress()
    for seed in range(1, 4):
        progress = commit(store, "j", progress, seed)
        checkpoint = store.last_checkpoint("j")
        assert checkpoint is not None and checkpoint.cycle == seed and checkpoint.state["cycle"] == seed
        assert checkpoint.state["progress"] == progress.to_dict()


def test_duplicate_cycle_writes_nothing(store: JobStore) -> None:
    store.create_job("j", SPEC)
    p1 = commit(store, "j", Progress(), 1)
    before = snapshot(store, "j")

    _, record, cands, evs = make_cycle(Progress(), 5)  # cycle 1 again, other data
    bigger = Progress(cycles=1, evaluations=99, best_score=-1.0, best_candidate={"x": 0.0})
    with pytest.raises(StoreError, match="cycle 1 of job 'j' is already committed"):
        store.commit_cycle("j", record, bigger, cands, evs, {"other": True})
    assert snapshot(store, "j") == before and p1.cycles == 1

    commit(store, "j", p1, 2)  # the store is still usable
    assert store.get_job("j").cycles == 2


def test_failure_inside_the_transaction_writes_nothing(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_job("j", SPEC)
    p1 = commit(store, "j", Progress(), 1)
    before = snapshot(store, "j")

    def explode(self: JobStore, *args: Any) -> None:
        raise RuntimeError("disk on fire")

    # After the summary update, the cycle row and the evaluation rows are written.
    monkeypatch.setattr(JobStore, "_upsert_checkpoint", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        commit(store, "j", p1, 2)
    assert snapshot(store, "j") == before


def test_constraint_violation_writes_nothing(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_job("j", SPEC)
    p1 = commit(store, "j", Progress(), 1)
    before = snapshot(store, "j")

    def no_batch(*args: Any) -> None:
        return None  # the batch's data column is NOT NULL

    monkeypatch.setattr(job_store_module, "evaluation_batch", no_batch)
    with pytest.raises(StoreError, match="cannot"):
        commit(store, "j", p1, 2)
    assert snapshot(store, "j") == before


def test_commit_rejects_bad_input_before_writing(store: JobStore) -> None:
    store.create_job("j", SPEC)
    progress, record, cands, evs = make_cycle(Progress(), 1)
    with pytest.raises(ValueError, match="3 candidates but 4 evaluations"):
        store.commit_cycle("j", record, progress, cands[:3], evs, {})
    with pytest.raises(TypeError, match="checkpoint state is not JSON-serialisable"):
        store.commit_cycle("j", record, progress, cands, evs, {"oops": {1, 2}})
    assert store.get_job("j").cycles == 0 and store.evaluations("j") == [] and store.cycles("j") == []


def test_reads_during_a_write_see_the_committed_state(
    db_url: str, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second store (as ``irefine status`` in another process) reads while a commit is open."""
    store.create_job("j", SPEC)
    p1 = commit(store, "j", Progress(), 1)
    seen: dict[str, Any] = {}
    real_upsert = JobStore._upsert_checkpoint

    with JobStore(db_url) as reader:

        def upsert_then_read(self: JobStore, *args: Any) -> None:
            real_upsert(self, *args)  # everything of cycle 2 is written but not committed
            started = time.monotonic()
            seen["job"] = reader.get_job("j")
            seen["evaluations"] = len(reader.evaluations("j"))
            seen["checkpoint"] = reader.last_checkpoint("j")
            seen["seconds"] = time.monotonic() - started

        monkeypatch.setattr(JobStore, "_upsert_checkpoint", upsert_then_read)
        commit(store, "j", p1, 2)
        monkeypatch.undo()

        assert seen["seconds"] < 2.0
        assert seen["job"].cycles == 1 and seen["evaluations"] == 4 and seen["checkpoint"].cycle == 1
        assert reader.get_job("j").cycles == 2 and len(reader.evaluations("j")) == 8


def test_sqlite_wal_reader_does_not_block_the_writer(sqlite_url: str) -> None:
    """In WAL mode a reader's open snapshot neither blocks a commit nor sees it until it ends."""
    with JobStore(sqlite_url) as store:
        store.create_job("j", SPEC)
        path = sqlite_url.removeprefix("sqlite:///")
        other = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            other.execute("BEGIN")
            assert other.execute("SELECT cycles FROM jobs WHERE id = 'j'").fetchone()[0] == 0
            started = time.monotonic()
            commit(store, "j", Progress(), 1)  # in rollback-journal mode this would wait for the reader
            assert time.monotonic() - started < 5.0
            assert other.execute("SELECT cycles FROM jobs WHERE id = 'j'").fetchone()[0] == 0  # its snapshot
            other.execute("COMMIT")
            assert other.execute("SELECT cycles FROM jobs WHERE id = 'j'").fetchone()[0] == 1
        finally:
            other.close()


# -- engines, URLs, settings --------------------------------------------------------------------------


def test_replica_serves_lag_tolerant_reads(db_url: str, other_db_url: str) -> None:
    with JobStore(other_db_url):  # an empty "replica" with the tables: it never receives writes
        pass
    with JobStore(db_url) as primary:
        primary.create_job("j", SPEC)
        commit(primary, "j", Progress(), 1)
    with JobStore(db_url, replica_url=other_db_url) as store:
        assert store.list_jobs() == []  # from the replica
        with pytest.raises(JobNotFoundError):
            store.get_job("j")
        assert store.cycles("j") == [] and store.evaluations("j") == []
        assert store.get_job("j", fresh=True).cycles == 1  # from the primary
        assert [j.job_id for j in store.list_jobs(fresh=True)] == ["j"]
        assert len(store.cycles("j", fresh=True)) == 1 and len(store.evaluations("j", fresh=True)) == 4
        checkpoint = store.last_checkpoint("j")  # resume reads always go to the primary
        assert checkpoint is not None and checkpoint.cycle == 1
        store.set_status("j", JobStatus.RUNNING)  # writes go to the primary
    with JobStore(db_url, replica_url=db_url) as same:  # a replica that is the primary itself
        assert [j.job_id for j in same.list_jobs()] == ["j"]
        assert same.get_job("j").status is JobStatus.RUNNING
        assert len(same.cycles("j")) == 1 and len(same.evaluations("j", cycle=1)) == 4


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "IRE_DATABASE_URL 'not a url': "),
        ("mysql+pymysql://u@localhost/db", "unsupported database 'mysql'"),
        ("postgresql+asyncpg://u@localhost/db", "driver 'asyncpg' is not supported"),
        ("sqlite+pysqlcipher:///x.db", "driver 'pysqlcipher' is not supported"),
        ("sqlite:////no/such/folder/irefine.db", "folder '/no/such/folder' does not exist"),
        ("nosuchdb://u@localhost/db", "unsupported database 'nosuchdb'"),
    ],
)
def test_bad_url_raises_spec_error(url: str, message: str) -> None:
    with pytest.raises(SpecError, match=r"^IRE_DATABASE_URL ") as info:
        JobStore(url)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_url_hides_the_password_and_names_the_replica(sqlite_url: str) -> None:
    with pytest.raises(SpecError) as info:
        JobStore("mysql://user:s3cret@localhost/db")
    assert "s3cret" not in str(info.value)
    with pytest.raises(SpecError, match=r"^IRE_DATABASE_REPLICA_URL 'oracle://u@h/db'"):
        JobStore(sqlite_url, replica_url="oracle://u@h/db")


def test_unreachable_postgres_is_transient() -> None:
    with pytest.raises(StoreUnavailableError, match="IRE_DATABASE_URL") as info:
        JobStore(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing")
    assert isinstance(info.value, TransientError)


def test_from_settings(tmp_path: Path, db_url: str) -> None:
    with JobStore.from_settings(Settings(home=tmp_path / "home")) as default:  # SQLite in IRE_HOME
        default.create_job("j", SPEC)
        assert (tmp_path / "home" / "irefine.db").exists()
    with JobStore.from_settings(Settings(database_url=db_url, database_replica_url=db_url)) as configured:
        configured.create_job("j", SPEC)
        assert configured.get_job("j").spec == SPEC


def test_two_stores_share_the_schema(db_url: str) -> None:
    """Creating the tables is idempotent: a second store on the same database finds them."""
    with JobStore(db_url) as first, JobStore(db_url) as second:
        first.create_job("j", SPEC)
        assert second.get_job("j").spec == SPEC


# -- services ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_redis_server_stop_and_start(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        assert client.ping()
        port = redis_server.port
        redis_server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        redis_server.start()
        assert redis_server.port == port and redis_server.url.endswith(f":{port}/0")
        assert client.ping()  # the same client reconnects
    finally:
        client.close()
        redis_server.start()  # leave it running for other tests
