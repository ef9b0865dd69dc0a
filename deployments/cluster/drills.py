"""Fault drills on a running ``irefine cluster``: start a realistic load, inject one fault mid-cycle,
wait (bounded) and measure what the fault cost.

A drill submits jobs on the four queues through the balancer (``irefine submit``), each
evaluation 50-200 ms (``tests.problems_for_tests:Slow``), waits until every job has committed a
cycle, injects the fault, repairs what a human or a supervisor would (some faults need nothing),
and waits for every job to end. It reports, for :func:`run_drill`'s JSON:

- ``jobs_started`` / ``jobs_completed``: jobs with a store record / with status completed;
  ``jobs_running_at_fault``: those the fault hit (still running when it was injected);
- ``results_equal``: every job's best score and candidate equal those of an uninterrupted run
  with the same spec and seed (computed once, in process, by :func:`reference_results`);
- ``evaluations_lost``: evaluations the job's budget asked for that no committed cycle holds,
  plus failed ones; ``duplicate_cycles``: cycles a second writer tried to commit again (the store
  refuses them; counted from the nodes' logs) plus any cycle number stored twice;
- ``failed_requests``: requests of a probe client (no retries) to the balancer that failed, and
  ``irefine submit`` calls that failed;
- ``recovery_s``: from the end of the fault to the next committed cycle of every job that was
  running at the fault (the slowest one), not counting commits in the first second after the
  fault (those were in flight in the processes a fault kills).
"""

from __future__ import annotations

import contextlib
import json
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.cluster.procs import stop_group, wait_until
from deployments.cluster.topology import NODES, PREFECT_DATABASE, SERVICES, STORE_DATABASE, ZONE_B, Cluster

QUEUES = ("critical", "high", "normal", "low")
_FINAL_FOR_GOOD = {"FAILED", "CANCELLED", "COMPLETED"}
PROBLEM = "tests.problems_for_tests:Slow"
IN_FLIGHT_S = 1.0


@dataclass(frozen=True)
class JobPlan:
    """One job of a drill's load: its id, queue and spec."""

    job_id: str
    queue: str
    spec: dict[str, Any]


def load_plans(tag: str, jobs: int = 4, cycles: int = 16, batch_size: int = 4) -> list[JobPlan]:
    """``jobs`` jobs over the four queues, evaluations of 50-200 ms, seeds 100, 101, ... (the same
    for every drill, so one reference run serves them all)."""
    plans = []
    for n in range(jobs):
        spec = {
            "problem": PROBLEM,
            "problem_params": {"ms": 50 + (150 * n) // max(jobs - 1, 1)},
            "strategy": "random",
            "batch_size": batch_size,
            "max_cycles": cycles,
            "seed": 100 + n,
        }
        plans.append(JobPlan(f"{tag}-{n}-{uuid.uuid4().hex[:6]}", QUEUES[n % len(QUEUES)], spec))
    return plans


_REFERENCES: dict[str, tuple[float | None, Any]] = {}


def reference_results(plans: Sequence[JobPlan]) -> dict[str, tuple[float | None, Any]]:
    """Each plan's (best score, best candidate) from an uninterrupted in-process run of its spec."""
    from engine.core import JobSpec
    from engine.execution.local import InProcessExecutor
    from engine.runner import create_job, run_job
    from engine.store.job_store import JobStore

    def one(plan: JobPlan) -> None:
        key = json.dumps(plan.spec, sort_keys=True)
        if key in _REFERENCES:
            return
        with tempfile.TemporaryDirectory() as folder:
            store = JobStore(f"sqlite:///{folder}/reference.db")
            try:
                job = create_job(store, JobSpec.parse(plan.spec), "reference")
                result = run_job(job, store, InProcessExecutor())
                _REFERENCES[key] = (result.progress.best_score, result.progress.best_candidate)
            finally:
                store.close()

    threads = [threading.Thread(target=one, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {plan.job_id: _REFERENCES[json.dumps(plan.spec, sort_keys=True)] for plan in plans}


class Probe(threading.Thread):
    """A client that asks the balancer for a flow-run count every ``interval`` s, without retries,
    and counts what failed."""

    def __init__(self, api_url: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.api_url, self.interval = api_url, interval
        self.ok = self.failed = 0
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not self._halt.is_set():
                start = time.monotonic()
                try:
                    response = client.post(f"{self.api_url}/flow_runs/count", json={})
                    response.raise_for_status()
                    self.ok += 1
                    self.latencies.append(time.monotonic() - start)
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:200])
                self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(15)


def resume_paused_queues(cluster: Cluster) -> list[str]:
    """Resume the work queues the pause-on-failures automation paused (each drill crashes runs
    on purpose; after three on one queue within 10 minutes it pauses, as it should for a real
    failure burst): what an operator does once the fault is over. The names resumed."""
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go() -> list[str]:
        async with get_client() as client:
            resumed = []
            for queue in await client.read_work_queues(work_pool_name="irefine-local"):
                if queue.is_paused:
                    await client.update_work_queue(queue.id, is_paused=False)
                    resumed.append(queue.name)
            return resumed

    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
        return asyncio.run(go())


def submit_all(cluster: Cluster, plans: Sequence[JobPlan]) -> list[tuple[bool, float, str]]:
    """Submit every plan at once through the balancer with what ``irefine submit`` calls
    (:func:`irefine.submit.submit_job`); per plan (accepted, seconds, error)."""
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from engine.core import JobSpec
    from irefine.submit import submit_job

    async def one(client: Any, plan: JobPlan) -> tuple[bool, float, str]:
        start = time.monotonic()
        try:
            spec = JobSpec.parse(plan.spec)
            await submit_job(client, spec, job_id=plan.job_id, urgency=plan.queue)  # type: ignore[arg-type]
        except Exception as exc:
            return False, time.monotonic() - start, f"{type(exc).__name__}: {exc}"[:300]
        return True, time.monotonic() - start, ""

    async def go() -> list[tuple[bool, float, str]]:
        async with get_client() as client:
            return list(await asyncio.gather(*(one(client, plan) for plan in plans)))

    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
        return asyncio.run(go())


def _rows(engine: Any, sql: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``sql``, a query on ``ANY(:ids)``, for ``ids``."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(sql), {"ids": list(ids)}).mappings()]


@dataclass
class StoreView:
    """The drill's jobs as the job store (primary) has them."""

    cluster: Cluster
    engine: Any = field(init=False)
    prefect_engine: Any = field(init=False)

    def __post_init__(self) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(self.cluster.database_url(STORE_DATABASE), pool_pre_ping=True)
        self.prefect_engine = create_engine(self.cluster.database_url(PREFECT_DATABASE), pool_pre_ping=True)

    def jobs(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with contextlib.suppress(Exception):
            sql = (
                "SELECT id, status, cycles, best_score, best_candidate, flow_run_id FROM jobs "
                "WHERE id = ANY(:ids)"
            )
            return {row["id"]: row for row in _rows(self.engine, sql, job_ids)}
        return {}

    def flow_run_states(self, flow_run_ids: Sequence[str]) -> dict[str, str]:
        """Each flow run's state type, from Prefect's database (on the same PostgreSQL)."""
        with contextlib.suppress(Exception):
            sql = "SELECT id::text AS id, state_type FROM flow_run WHERE id::text = ANY(:ids)"
            rows = _rows(self.prefect_engine, sql, flow_run_ids)
            return {row["id"]: str(row["state_type"]).rsplit(".", 1)[-1] for row in rows}
        return {}

    def cycles(self, job_ids: Sequence[str]) -> list[dict[str, Any]]:
        return _rows(
            self.engine,
            "SELECT job_id, cycle, evaluations, failed, extract(epoch FROM finished_at) AS at "
            "FROM cycles WHERE job_id = ANY(:ids) ORDER BY finished_at",
            job_ids,
        )

    def close(self) -> None:
        self.engine.dispose()
        self.prefect_engine.dispose()


def _log_sizes(cluster: Cluster) -> dict[str, int]:
    sizes = {}
    for name in NODES:
        path = cluster.folder / "logs" / f"{name}.log"
        sizes[name] = path.stat().st_size if path.exists() else 0
    return sizes


def _refused_commits(cluster: Cluster, since: dict[str, int]) -> int:
    count = 0
    for name, offset in since.items():
        path = cluster.folder / "logs" / f"{name}.log"
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            fh.seek(offset)
            count += fh.read().decode(errors="replace").count("is already committed")
    return count


@dataclass
class Fault:
    """A drill's fault: ``inject`` breaks something (it may take a while, e.g. Redis down 30 s);
    ``repair`` afterwards restores the full topology for the next drill."""

    inject: Callable[[Cluster], None]
    repair: Callable[[Cluster], None] = lambda cluster: None


def run_drill(
    cluster: Cluster,
    name: str,
    fault: Fault,
    *,
    jobs: int = 4,
    cycles: int = 16,
    timeout: float = 420.0,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run one drill on ``cluster`` (up, healthy); its figures (module docstring)."""
    plans = load_plans(name.replace("_", "-"), jobs, cycles)
    ids = [p.job_id for p in plans]
    references = reference_results(plans)
    store = StoreView(cluster)
    probe = Probe(cluster.api_url)
    probe.start()
    offsets = _log_sizes(cluster)
    failed_submissions = 0
    try:
        resumed = resume_paused_queues(cluster)
        if resumed:
            log(f"{name}: resumed the queues an earlier drill's crashes paused: {', '.join(resumed)}")
        results = submit_all(cluster, plans)
        failed_submissions = sum(1 for ok, _, _ in results if not ok)
        for ok, _, out in results:
            if not ok:
                log(f"{name}: submission failed: {out}")
        log(f"{name}: {jobs - failed_submissions} jobs submitted; waiting for each to commit a cycle")

        def all_running() -> bool:
            found = store.jobs(ids)
            # Every job has committed a cycle (a job still pending has not started: the fault
            # would not hit it), or has ended already.
            return len(found) == len(ids) and all(
                j["cycles"] >= 1 or j["status"] in ("completed", "failed", "cancelled")
                for j in found.values()
            )

        wait_until(all_running, 420, lambda: f"{name}: the jobs did not all start within 420 s")
        before = store.jobs(ids)
        affected = [i for i, j in before.items() if j["status"] not in ("completed", "failed")]
        fault_at = time.time()
        log(f"{name}: injecting the fault ({len(affected)} jobs running)")
        fault.inject(cluster)
        fault_end = time.time()

        def ended() -> bool:
            # A job whose run failed may still come back: a run left Running by a dead flow
            # process is marked Crashed after 90 s without heartbeat and resumed. Settled: the
            # job completed, or its flow run ended for good (Failed, Cancelled, Completed).
            found = store.jobs(ids)
            if len(found) < len(ids):
                return False
            states = store.flow_run_states([j["flow_run_id"] for j in found.values() if j["flow_run_id"]])
            return all(
                j["status"] == "completed" or states.get(str(j["flow_run_id"])) in _FINAL_FOR_GOOD
                for j in found.values()
            )

        with contextlib.suppress(Exception):
            wait_until(ended, timeout, lambda: "timeout")
        log(f"{name}: jobs ended (or timed out) {time.time() - fault_end:.0f} s after the fault; repairing")
        fault.repair(cluster)
        after = store.jobs(ids)
        cycles_rows = store.cycles(ids)
    finally:
        probe.stop()
        store.close()
    recovery = 0.0
    for job_id in affected:
        # A commit within IN_FLIGHT_S of the fault's end was already under way in a process the
        # fault killed (a node or zone loss): it is not the job's recovery.
        later = [
            row["at"]
            for row in cycles_rows
            if row["job_id"] == job_id and float(row["at"]) > fault_end + IN_FLIGHT_S
        ]
        recovery = max(recovery, (float(min(later)) - fault_end) if later else float("inf"))
    lost = 0
    stored_twice = 0
    equal = True
    for plan in plans:
        rows = [r for r in cycles_rows if r["job_id"] == plan.job_id]
        numbers = [r["cycle"] for r in rows]
        stored_twice += len(numbers) - len(set(numbers))
        done = sum(r["evaluations"] - r["failed"] for r in rows)
        lost += max(0, plan.spec["max_cycles"] * plan.spec["batch_size"] - done)
        job = after.get(plan.job_id) or {}
        best_candidate = json.loads(job["best_candidate"]) if job.get("best_candidate") else None
        equal = equal and (job.get("best_score"), best_candidate) == references[plan.job_id]
    return {
        "jobs_started": len(after),
        "jobs_completed": sum(1 for j in after.values() if j["status"] == "completed"),
        "jobs_running_at_fault": len(affected),
        "results_equal": equal,
        "evaluations_lost": lost,
        "duplicate_cycles": stored_twice + _refused_commits(cluster, offsets),
        "failed_requests": probe.failed + failed_submissions,
        "recovery_s": round(recovery, 1) if recovery != float("inf") else None,
        "fault_s": round(fault_end - fault_at, 1),
        "probe_requests": probe.ok + probe.failed,
    }


# -- the faults -------------------------------------------------------------------------------------


def _restart(*names: str) -> Callable[[Cluster], None]:
    def repair(cluster: Cluster) -> None:
        for name in names:
            if cluster.health(name) == "down":
                cluster.start_part(name, wait=False)
        for name in names:
            cluster.wait_healthy(name)

    return repair


def _drain_and_stop(cluster: Cluster) -> None:
    from deployments.cluster import haproxy

    cluster.drain("api-b")
    with contextlib.suppress(Exception):  # open requests finish (at most 10 s)
        wait_until(lambda: _sessions(cluster, "api-b") == 0, 10, lambda: "")
    stop_group(cluster.pids["api-b"])
    haproxy.set_state(cluster.admin_socket, "api-b", "maint")


def _sessions(cluster: Cluster, replica: str) -> int:
    from deployments.cluster import haproxy

    answer = haproxy.admin(cluster.admin_socket, "show stat")
    header, *rows = [line for line in answer.splitlines() if line.strip()]
    columns = header.lstrip("# ").split(",")
    for row in rows:
        record = dict(zip(columns, row.split(","), strict=False))
        if record.get("pxname") == haproxy.BACKEND and record.get("svname") == replica:
            return int(record.get("scur") or 0)
    return 0


def _undrain(cluster: Cluster) -> None:
    _restart("api-b")(cluster)
    cluster.undrain("api-b")


def _redis_down(seconds: float) -> Callable[[Cluster], None]:
    def inject(cluster: Cluster) -> None:
        stop_group(cluster.pids["redis"])
        time.sleep(seconds)
        cluster.start_part("redis")

    return inject


def _restart_services(cluster: Cluster) -> None:
    """Restart the services processes: Prefect's services do not all reconnect after a Redis outage
    (the automation triggers' consumer was seen gone)."""
    for name in SERVICES:
        stop_group(cluster.pids[name], timeout=10)
        cluster.start_part(name, wait=False)
    for name in SERVICES:
        cluster.wait_healthy(name)


def _restart_postgres(cluster: Cluster) -> None:
    primary = cluster.pg(cluster.primary)
    primary.stop("fast")
    cluster.start_part(cluster.primary)


def _kill_busiest_node(cluster: Cluster) -> None:
    """SIGKILL the process group of the node running the most flow-run processes (a lost machine)."""
    from deployments.cluster.procs import group_size

    busiest = max(NODES, key=lambda name: group_size(cluster.pids[name]))
    cluster.kill(busiest, signal.SIGKILL)


def _kill_zone(cluster: Cluster) -> None:
    for name in ZONE_B:
        with contextlib.suppress(Exception):
            cluster.kill(name, signal.SIGKILL)


DRILLS: dict[str, Fault] = {
    "api_replica_kill": Fault(lambda c: c.kill("api-a"), _restart("api-a")),
    "api_replica_drain": Fault(_drain_and_stop, _undrain),
    "services_kill": Fault(lambda c: c.kill("services-a"), _restart("services-a")),
    "node_loss": Fault(_kill_busiest_node, _restart(*NODES)),
    "dask_worker_kill": Fault(lambda c: c.kill("dask-worker-0"), lambda c: c.wait_healthy("dask")),
    "dask_scheduler_kill": Fault(lambda c: c.kill("dask-scheduler"), lambda c: c.wait_healthy("dask")),
    "redis_stop_30s": Fault(_redis_down(30.0)),
    "postgres_restart": Fault(_restart_postgres),
    "replica_promote": Fault(lambda c: c.failover()),
    "zone_loss": Fault(_kill_zone, _restart("api-b", "services-b", "node-b")),
}
"""Every drill by name; ``zone_loss`` kills everything of zone b (API replica b, services b, node b,
Dask worker 1) at once."""
