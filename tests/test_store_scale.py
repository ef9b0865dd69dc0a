"""The job store scaled out on real PostgreSQL servers: hash partitions, shards, a streaming
replica for lag-tolerant reads, and a multi-host URL that follows a promotion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from engine.core import JobNotFoundError, JobSpec, Progress, SpecError, TransientError
from engine.settings import Settings
from engine.store import JobStatus, JobStore, StoreError, StoreUnavailableError, shard_index
from engine.store.engines import make_engine
from tests.services import PostgresReplica, PostgresServer
from tests.test_store import SPEC, commit

ROOT = Path(__file__).resolve().parents[1]
GROWING = ("cycles", "evaluation_batches", "anomalies")


class _Finding:
    def __init__(self, cycle: int, kind: str) -> None:
        self.cycle, self.kind, self.message, self.evidence = cycle, kind, f"{kind} at {cycle}", {"z": 3.5}


def _scalar(url: str, sql: str, **params: object) -> object:
    engine = create_engine(make_url(url))
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


def _execute(url: str, sql: str) -> None:
    engine = create_engine(make_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def _relkind(url: str, table: str) -> str:
    return str(_scalar(url, "SELECT relkind FROM pg_class WHERE relname = :t", t=table))


def _partitions(url: str, table: str) -> int:
    sql = "SELECT count(*) FROM pg_inherits WHERE inhparent = CAST(:t AS regclass)"
    return int(_scalar(url, sql, t=table))  # type: ignore[call-overload]


def _fill(store: JobStore, job_ids: list[str], cycles: int = 2) -> dict[str, Progress]:
    """Create the jobs, commit ``cycles`` cycles and two anomalies each; their progress after."""
    progress: dict[str, Progress] = {}
    for job_id in job_ids:
        store.create_job(job_id, SPEC)
        progress[job_id] = Progress()
        for c in range(1, cycles + 1):
            progress[job_id] = commit(store, job_id, progress[job_id], c)
        store.add_anomalies(job_id, [_Finding(1, "stall"), _Finding(2, "regression")])
    return progress


# -- unit: routing and settings ---------------------------------------------------------------------


def test_shard_index_is_a_stable_hash_of_the_job_id() -> None:
    # Fixed values (blake2b, not Python's salted hash): a job lands on the same shard in every
    # process and release.
    assert [shard_index(f"job-{i}", 2) for i in range(8)] == [0, 1, 0, 0, 1, 0, 0, 0]
    assert [shard_index(f"job-{i}", 3) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert shard_index("job-0", 1) == 0
    spread = [shard_index(f"j{i}", 2) for i in range(200)]
    assert 70 < spread.count(0) < 130


def test_settings_shard_list_splits_between_urls_not_inside_multi_host_ones(tmp_path: Path) -> None:
    multi = "postgresql+psycopg://u@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write"
    settings = Settings(home=tmp_path, database_shards=f"{multi} , postgresql+psycopg://u@h3/db2")
    assert settings.database_shard_urls() == [multi, "postgresql+psycopg://u@h3/db2"]
    assert Settings(home=tmp_path).database_shard_urls() == [f"sqlite:///{tmp_path / 'irefine.db'}"]
    clash = Settings(home=tmp_path, database_url="sqlite:///x.db", database_shards="sqlite:///y.db")
    with pytest.raises(
        SpecError, match="IRE_DATABASE_URL must be unset or the first URL of IRE_DATABASE_SHARDS"
    ):
        clash.database_shard_urls()
    replica = Settings(
        home=tmp_path,
        database_shards=f"sqlite:///{tmp_path / 'a.db'},sqlite:///{tmp_path / 'b.db'}",
        database_replica_url=f"sqlite:///{tmp_path / 'a.db'}",
    )
    with pytest.raises(SpecError, match=r"^IRE_DATABASE_REPLICA_URL lists 1 replicas for 2 shards"):
        JobStore.from_settings(replica)


def test_each_shard_reads_from_its_own_replica(tmp_path: Path) -> None:
    shards = [f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"]
    # Stand-in replicas: shard 0's replica is the primary itself, shard 1's an empty database.
    replicas = [shards[0], f"sqlite:///{tmp_path / 'b-replica.db'}"]
    JobStore(replicas[1]).close()
    ids = ["job-0", "job-1"]  # on shards 0 and 1
    assert [shard_index(j, 2) for j in ids] == [0, 1]
    with JobStore(shards) as writer:
        _fill(writer, ids, cycles=1)
    settings = Settings(
        home=tmp_path, database_shards=",".join(shards), database_replica_url=",".join(replicas)
    )
    with JobStore.from_settings(settings) as store:
        assert [j.job_id for j in store.list_jobs()] == ["job-0"]  # shard 1's replica has no jobs
        assert store.get_job("job-0").cycles == 1
        with pytest.raises(JobNotFoundError):
            store.get_job("job-1")
        assert store.get_job("job-1", fresh=True).cycles == 1
        assert len(store.list_jobs(fresh=True)) == 2


def test_multi_host_urls_are_accepted_in_both_spellings() -> None:
    libpq = make_engine(
        "postgresql+psycopg://u:pw@127.0.0.1:1,127.0.0.1:2/db?target_session_attrs=read-write", "X"
    )
    alchemy = make_engine("postgresql+psycopg://u:pw@/db?host=127.0.0.1:1&host=127.0.0.1:2", "X")
    try:
        for engine in (libpq, alchemy):
            assert engine.url.query["host"] == ("127.0.0.1:1", "127.0.0.1:2")
            assert engine.url.database == "db" and engine.url.password == "pw"
        assert libpq.url.query["target_session_attrs"] == "read-write"
    finally:
        libpq.dispose()
        alchemy.dispose()


def test_sqlite_shards_hold_their_own_jobs(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"]
    with JobStore(urls) as store:
        ids = [f"job-{i}" for i in range(10)]
        _fill(store, ids, cycles=1)
        assert sorted(j.job_id for j in store.list_jobs()) == sorted(ids)
    for index, url in enumerate(urls):
        held = {row for row in _sqlite_ids(url)}
        assert held == {i for i in ids if shard_index(i, 2) == index} and held


def _sqlite_ids(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT id FROM jobs"))]
    finally:
        engine.dispose()


# -- partitions -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_growing_tables_are_hash_partitioned_by_job_id(postgres_url: str) -> None:
    with JobStore(postgres_url, partitions=4) as store:
        ids = [f"p-{i}" for i in range(12)]
        _fill(store, ids)
        for table in GROWING:
            assert _relkind(postgres_url, table) == "p" and _partitions(postgres_url, table) == 4
            used = _scalar(postgres_url, f"SELECT count(DISTINCT tableoid) FROM {table}")
            assert used == 4, table  # 12 jobs over 4 partitions: each gets some
        assert _relkind(postgres_url, "jobs") == "r" and _relkind(postgres_url, "checkpoints") == "r"
        assert len(store.cycles("p-3")) == 2 and len(store.evaluations("p-3", cycle=2)) == 4
        assert [a.kind for a in store.anomalies("p-3")] == ["stall", "regression"]
        with pytest.raises(StoreError, match="cycle 1 of job 'p-3' is already committed"):
            commit(store, "p-3", Progress(), 2)
        store.delete_job("p-3")
        assert store.cycles("p-3") == [] and store.anomalies("p-3") == []
    pk = _scalar(
        postgres_url,
        "SELECT string_agg(a.attname, ',' ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = CAST('anomalies' AS regclass) AND i.indisprimary",
    )
    assert pk == "job_id,cycle,kind"


@pytest.mark.integration
def test_plain_tables_are_partitioned_on_upgrade_keeping_their_rows(postgres_url: str) -> None:
    with JobStore(postgres_url, partitions=0) as old:  # as a release before partitioning made it
        progress = _fill(old, ["u-1", "u-2", "u-3"])
        before = [(old.cycles(j), old.evaluations(j), old.anomalies(j)) for j in ("u-1", "u-2", "u-3")]
    _execute(postgres_url, "DROP TABLE store_shard")  # nor did it know about shards
    assert _relkind(postgres_url, "cycles") == "r"
    with JobStore(postgres_url) as store:
        for table in GROWING:
            assert _relkind(postgres_url, table) == "p" and _partitions(postgres_url, table) == 8
        leftovers = "SELECT count(*) FROM pg_class WHERE relname LIKE '%unpartitioned%'"
        assert _scalar(postgres_url, leftovers) == 0
        after = [(store.cycles(j), store.evaluations(j), store.anomalies(j)) for j in ("u-1", "u-2", "u-3")]
        assert after == before
        commit(store, "u-1", progress["u-1"], 3)
        assert [c.cycle for c in store.cycles("u-1")] == [1, 2, 3]
        with pytest.raises(StoreError, match="already committed"):
            commit(store, "u-2", Progress(), 1)
    with JobStore(postgres_url) as again:  # idempotent: nothing left to migrate
        assert len(again.cycles("u-1")) == 3


@pytest.mark.integration
def test_stores_starting_together_upgrade_a_plain_database_once(postgres_url: str) -> None:
    with JobStore(postgres_url, partitions=0) as old:
        _fill(old, ["t-1", "t-2"], cycles=3)
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def open_store() -> None:
        try:
            barrier.wait()
            with JobStore(postgres_url) as store:
                assert len(store.cycles("t-2")) == 3
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and _relkind(postgres_url, "cycles") == "p"
    assert _scalar(postgres_url, "SELECT count(*) FROM cycles") == 6


# -- shards -----------------------------------------------------------------------------------------


@pytest.fixture
def two_shards(postgres_server: PostgresServer) -> Iterator[list[str]]:
    urls = [postgres_server.new_database(), postgres_server.new_database()]
    yield urls
    for url in urls:
        postgres_server.drop_database(str(make_url(url).database))


@pytest.mark.integration
def test_jobs_spread_over_two_postgres_shards(two_shards: list[str]) -> None:
    ids = [f"shard-job-{i}" for i in range(10)]
    with JobStore(two_shards) as store:
        for job_id in ids:
            store.create_job(job_id, SPEC)
            time.sleep(0.002)  # distinct creation times: list order is checkable
        for job_id in ids[:2]:  # on shards 0 and 1: every per-job call goes to the job's shard
            progress = commit(store, job_id, Progress(), 1)
            commit(store, job_id, progress, 2)
            store.heartbeat(job_id)
            store.add_anomalies(job_id, [_Finding(2, "stall")])
            last = store.last_cycle(job_id)
            checkpoint = store.last_checkpoint(job_id)
            assert last is not None and last.cycle == 2 and checkpoint is not None and checkpoint.cycle == 2
            assert [a.kind for a in store.anomalies(job_id)] == ["stall"]
            shard_url = two_shards[store.shard_of(job_id)]
            other_url = two_shards[1 - store.shard_of(job_id)]
            for table, rows in (
                ("cycles", 2),
                ("evaluation_batches", 2),
                ("checkpoints", 1),
                ("anomalies", 1),
            ):
                assert _scalar(shard_url, f"SELECT count(*) FROM {table} WHERE job_id = :j", j=job_id) == rows
                assert _scalar(other_url, f"SELECT count(*) FROM {table} WHERE job_id = :j", j=job_id) == 0
        assert [store.shard_of(j) for j in ids[:2]] == [0, 1]
        held = [{str(r) for r in _ids(url)} for url in two_shards]
        assert held[0] and held[1] and held[0] | held[1] == set(ids) and not held[0] & held[1]
        assert all(shard_index(j, 2) == k for k, ids_k in enumerate(held) for j in ids_k)
        assert [j.job_id for j in store.list_jobs()] == ids[::-1]  # merged, newest first
        assert [j.job_id for j in store.list_jobs(limit=3)] == ids[:-4:-1]
        assert store.get_job(ids[0]).cycles == 2 and len(store.evaluations(ids[0])) == 8
        store.set_status(ids[1], JobStatus.RUNNING)
        store.delete_job(ids[2])
        with pytest.raises(JobNotFoundError):
            store.get_job(ids[2])
    with JobStore(two_shards) as reopened:  # placement survives a restart
        assert reopened.get_job(ids[1]).status is JobStatus.RUNNING
        assert len(reopened.list_jobs()) == 9


def _ids(url: str) -> list[object]:
    engine = create_engine(make_url(url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT id FROM jobs")).scalars())
    finally:
        engine.dispose()


@pytest.mark.integration
def test_a_changed_shard_list_is_refused(two_shards: list[str]) -> None:
    with JobStore(two_shards):
        pass
    with pytest.raises(
        SpecError, match=r"^IRE_DATABASE_SHARDS\[0\] .* holds shard 2 of 2 but is listed as shard 1 of 2"
    ):
        JobStore(two_shards[::-1])
    with pytest.raises(
        SpecError, match=r"^IRE_DATABASE_URL .* holds shard 1 of 2 but is listed as shard 1 of 1"
    ):
        JobStore(two_shards[0])


@pytest.mark.integration
@pytest.mark.slow
def test_cli_list_and_status_see_the_jobs_of_every_shard(two_shards: list[str], tmp_path: Path) -> None:
    from engine.execution import InProcessExecutor
    from engine.runner import create_job, run_job

    ids = [f"cli-{i}" for i in range(4)]
    assert sorted(shard_index(j, 2) for j in ids) == [0, 0, 1, 1]
    spec = JobSpec.parse({"problem": "sphere", "strategy": "random", "batch_size": 5, "max_evaluations": 20})
    with JobStore(two_shards) as store:
        for job_id in ids:  # real runs of the refinement loop, each writing to its job's shard
            result = run_job(create_job(store, spec, job_id), store, InProcessExecutor())
            assert result.status is JobStatus.COMPLETED
    assert all(len(_ids(url)) == 2 for url in two_shards)
    env = {**os.environ, "IRE_HOME": str(tmp_path / "home"), "IRE_DATABASE_SHARDS": ",".join(two_shards)}
    env.pop("IRE_DATABASE_URL", None)
    listed = json.loads(_irefine(env, "list", "--json").stdout)
    assert sorted(j["job_id"] for j in listed) == ids and {j["status"] for j in listed} == {"completed"}
    assert shard_index("cli-0", 2) != shard_index("cli-2", 2)
    for job_id in ("cli-0", "cli-2"):  # one job of each shard
        status = json.loads(_irefine(env, "status", job_id, "--json").stdout)
        assert status["job_id"] == job_id and status["cycles"] == 4 and status["evaluations"] == 20
    env["IRE_DATABASE_SHARDS"] = ",".join(two_shards[::-1])
    refused = subprocess.run(
        [sys.executable, "-m", "irefine", "list"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "holds shard 2 of 2" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _irefine(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "irefine", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out


# -- a real streaming replica, and failover ---------------------------------------------------------


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[PostgresServer, PostgresReplica]]:
    """A private primary and its streaming replica (the session server is not replicated)."""
    if os.environ.get("IRE_TEST_POSTGRES_URL"):
        pytest.fail("the replica tests need local PostgreSQL binaries, not IRE_TEST_POSTGRES_URL")
    with PostgresServer() as primary, PostgresReplica(primary) as replica:
        yield primary, replica


@pytest.mark.integration
@pytest.mark.slow
def test_lag_tolerant_reads_come_from_a_streaming_replica(
    primary_and_replica: tuple[PostgresServer, PostgresReplica],
) -> None:
    primary, replica = primary_and_replica
    with JobStore(primary.url, replica_url=replica.url) as store:
        store.create_job("r", SPEC)
        progress = commit(store, "r", Progress(), 1)
        replica.wait_caught_up()
        assert store.get_job("r").cycles == 1 and len(store.evaluations("r")) == 4
        replica.pause_replay()  # the replica now lags behind for as long as we like
        try:
            commit(store, "r", progress, 2)
            store.create_job("r2", SPEC)
            assert store.get_job("r").cycles == 1 and len(store.cycles("r")) == 1  # the replica's past
            assert [j.job_id for j in store.list_jobs()] == ["r"]
            with pytest.raises(JobNotFoundError):
                store.get_job("r2")
            assert store.get_job("r", fresh=True).cycles == 2  # the primary's present
            checkpoint = store.last_checkpoint("r")  # resuming reads the primary
            assert checkpoint is not None and checkpoint.cycle == 2
        finally:
            replica.resume_replay()
        replica.wait_caught_up()
        # Replayed WAL shows to new snapshots at once as a rule; give a loaded machine a moment.
        deadline = time.monotonic() + 20
        while store.get_job("r").cycles != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get_job("r").cycles == 2 and [j.job_id for j in store.list_jobs()] == ["r2", "r"]
    assert _scalar(replica.url, "SELECT pg_is_in_recovery()") is True
    assert _relkind(replica.url, "cycles") == "p"  # the partitions are replicated too


@pytest.mark.integration
@pytest.mark.slow
def test_multi_host_url_follows_a_promoted_replica(
    primary_and_replica: tuple[PostgresServer, PostgresReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """A store call made while no server accepts writes (the old primary fenced, the replica not
    yet promoted) is retried until the promotion and then succeeds; without a promotion within
    the retry window it fails with a one-line error that says so."""
    primary, replica = primary_and_replica
    # The replica is listed first: target_session_attrs must skip it while it is a standby.
    hosts = f"{replica.host}:{replica.port},{primary.host}:{primary.port}"
    url = f"postgresql+psycopg://{primary.user}@{hosts}/{primary.database}?target_session_attrs=read-write"
    with JobStore(url) as store:
        store.create_job("f", SPEC)
        progress = commit(store, "f", Progress(), 1)
        replica.wait_caught_up()
        primary.close()  # fence the old primary: stopped before the replica takes over
        store.retry_seconds = 1.0
        started = time.monotonic()
        with pytest.raises(
            StoreUnavailableError, match=r"cannot read job 'f'.*still failing after"
        ) as window:
            store.get_job("f", fresh=True)  # no read-write server, and no promotion coming
        assert isinstance(window.value, TransientError) and "\n" not in str(window.value)
        assert 1.0 <= time.monotonic() - started < 10
        store.retry_seconds = 30.0
        promotion = threading.Timer(3.0, replica.promote)
        promotion.start()
        try:
            started = time.monotonic()
            progress = commit(store, "f", progress, 2)  # waits out the switch
            waited = time.monotonic() - started
        finally:
            promotion.join()
        store.set_status("f", JobStatus.COMPLETED)
        assert store.get_job("f", fresh=True).cycles == 2
    assert 3.0 <= waited < 25, waited
    assert any("retry" in r.getMessage() for r in caplog.records)  # it was retried, not lucky
    assert _scalar(replica.url, "SELECT cycles FROM jobs WHERE id = 'f'") == 2
    assert _scalar(replica.url, "SELECT pg_is_in_recovery()") is False


@pytest.mark.integration
@pytest.mark.slow
def test_store_calls_ride_out_a_postgres_restart(caplog: pytest.LogCaptureFixture) -> None:
    """A job committing cycles while PostgreSQL restarts (connections refused, then reset) loses
    none and sees no error: each call is retried until the server is back."""
    if os.environ.get("IRE_TEST_POSTGRES_URL"):
        pytest.fail("the restart test needs local PostgreSQL binaries, not IRE_TEST_POSTGRES_URL")
    errors: list[BaseException] = []
    with PostgresServer() as server, JobStore(server.url) as store:
        store.create_job("p", SPEC)
        committed = threading.Event()

        def work() -> None:
            try:
                progress = Progress()
                for cycle in range(1, 31):
                    progress = commit(store, "p", progress, cycle)
                    committed.set()
                    time.sleep(0.05)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        assert committed.wait(30)
        # pg_ctl restart keeps the server's options; fast: open sessions are cut (reset)
        log = server.data_dir.parent / "server.log"  # -l: else the server keeps pg_ctl's output open
        server._run(server.bindir / "pg_ctl", "-D", server.data_dir, "-l", log, "-m", "fast", "-w", "restart")
        worker.join(90)
        assert not worker.is_alive() and errors == [], errors
        assert store.get_job("p").cycles == 30 and [c.cycle for c in store.cycles("p")] == list(range(1, 31))
    assert any("retry" in r.getMessage() for r in caplog.records)
