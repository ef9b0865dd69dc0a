"""Load on a real ``irefine cluster``: N jobs submitted through the balancer across the four
priorities (what ``irefine submit`` calls, ``irefine.submit.submit_job``, 8 at a time), one API
replica killed -9 when half of them are in, every job run by the cluster's two worker nodes.

Measured: jobs lost (flow run not Completed or job not completed), priority inversions, the
most jobs running at once against the running-jobs limit (tests/queue_scenario.py, as
bench/queues.py), submissions accepted per second, API latency p50/p95 (a probe client and the
submissions), p95 queue wait per priority (creation to Running), and CPU seconds per job spent in
Prefect (API replicas, services, PostgreSQL, Redis, the nodes with their flow-run processes)
against those in evaluations (the Dask workers).

Progress goes to stderr; the last stdout line is one JSON object. From the repository root::

    .venv/bin/python bench/load.py [--jobs 100] [--job-limit 6] [--dir CLUSTER_FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIX_SHARES = {"critical": 0.1, "high": 0.2, "normal": 0.4, "low": 0.3}
JOB_SPEC = {
    "problem": "tests.problems_for_tests:Slow",
    "problem_params": {"ms": 50},
    "strategy": "random",
    "batch_size": 2,
    "max_cycles": 2,
}


KILLED_CPU_S = {"prefect": 0.0}
"""CPU seconds of parts the load kills (api-a), taken just before the kill."""


def log(line: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def group_cpu_seconds(pgids: list[int]) -> float:
    """CPU seconds of every live process in these process groups, their reaped children included."""
    from deployments.cluster.procs import process_stats

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for fields in process_stats():
        if int(fields[2]) in pgids:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs to submit (default 100)")
    parser.add_argument("--job-limit", type=int, default=6, help="running-jobs limit (irefine setup)")
    parser.add_argument("--timeout", type=float, default=780.0, help="seconds to wait for the runs to end")
    parser.add_argument("--dir", type=Path, help="use the running cluster of this folder (left running)")
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The jobs run tests.problems_for_tests through deployment runs: the nodes' allow-list.
    os.environ.setdefault("IRE_PROBLEM_MODULES", "tests")
    from deployments.cluster import Cluster

    if args.dir:
        cluster = Cluster(args.dir, log=log)
    else:
        folder = Path(tempfile.mkdtemp(prefix="ire-load-", dir="/tmp"))
        folder.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data folder
        cluster = Cluster(folder / "cluster", log=log)
    started = time.monotonic()
    try:
        if not args.dir:
            cluster.up(balancer_port=0, job_limit=args.job_limit)
        summary = run_load(cluster, args)
        summary["total_s"] = round(time.monotonic() - started, 1)
    finally:
        if not args.dir:
            cluster.down()
    print(json.dumps(summary))


def run_load(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.cluster.drills import Probe
    from deployments.cluster.topology import PREFECT_DATABASE, STORE_DATABASE
    from tests.queue_scenario import ScenarioConfig, ScenarioResult, _observe, _wait_until_ended

    env = {
        **os.environ,
        **cluster.client_env(),
        "PREFECT_HOME": str(cluster.folder / "prefect-home" / "client"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "irefine", "setup", "--no-aks", "--job-limit", str(args.job_limit),
         "--submission-rate", "50"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"irefine setup failed: {done.stderr[-1500:]}")
    mix = {q: max(1, round(share * args.jobs)) for q, share in MIX_SHARES.items()}
    mix["normal"] += args.jobs - sum(mix.values())
    config = ScenarioConfig(mix=mix, job_limit=args.job_limit, submission_rate=50.0)
    prefect_groups = [cluster.pids[n] for n in ("api-a", "api-b", "services-a", "services-b", "redis")]
    prefect_groups += [cluster.pg(n).pid() or 0 for n in ("postgres-a", "postgres-b")]
    node_groups = [cluster.pids[n] for n in ("node-a", "node-b")]
    dask_groups = [int(p) for n, p in cluster.dask_state()["pids"].items() if n.startswith("dask-worker")]
    cpu_before = {k: group_cpu_seconds(g) for k, g in (("prefect", prefect_groups), ("nodes", node_groups),
                                                       ("evaluations", dask_groups))}  # fmt: skip
    probe = Probe(cluster.api_url, interval=0.5)
    probe.start()
    log(f"submitting {args.jobs} jobs ({mix}); api-a is killed when half are in")
    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
        submitted, latencies, failures, submit_seconds = asyncio.run(_submit(cluster, config, args.jobs))
        log(f"{len(submitted)} accepted in {submit_seconds:.1f} s, {len(failures)} failed; waiting for runs")
        t0 = time.monotonic()
        try:
            asyncio.run(_wait_until_ended([s.flow_run_id for s in submitted], args.timeout))
        except Exception as exc:  # a timeout still reports what ended
            log(f"not every run ended: {exc}")
        log(f"runs ended after {time.monotonic() - t0:.0f} s; reading states and jobs")
        observed, queue_limits, slots_left, evaluation_slots = asyncio.run(
            _observe(submitted, cluster.database_url(STORE_DATABASE), cluster.database_url(PREFECT_DATABASE))
        )
    probe.stop()
    if cluster.health("api-a") == "down":  # the topology whole again for whoever runs next
        cluster.start_part("api-a")
    cpu = {k: group_cpu_seconds(g) - cpu_before[k] for k, g in (("prefect", prefect_groups),
           ("nodes", node_groups), ("evaluations", dask_groups))}  # fmt: skip
    cpu["prefect"] += KILLED_CPU_S["prefect"]
    result = ScenarioResult(config, [], observed, queue_limits, submit_seconds, slots_left, evaluation_slots)
    scenario = result.summary()
    api_latencies = probe.latencies + latencies
    jobs = max(1, len(submitted))
    return {
        "bench": "load",
        "jobs": args.jobs,
        "accepted": len(submitted),
        "failed_submissions": len(failures),
        "lost": scenario["lost"] + len(failures),
        "priority_inversions": scenario["priority_inversions"],
        "max_running": scenario["max_running"],
        "job_limit": args.job_limit,
        "submissions_per_s": round(len(submitted) / submit_seconds, 2) if submit_seconds else None,
        "api_p50_ms": round(1000 * (percentile(api_latencies, 0.5) or 0), 1),
        "api_p95_ms": round(1000 * (percentile(api_latencies, 0.95) or 0), 1),
        "probe_failed_requests": probe.failed,
        "p95_wait_s_by_queue": scenario["p95_wait_s_by_queue"],
        "cpu_s_per_job": {
            "prefect_server_db_redis": round(cpu["prefect"] / jobs, 2),
            "nodes_and_flow_processes": round(cpu["nodes"] / jobs, 2),
            "evaluations": round(cpu["evaluations"] / jobs, 2),
        },
    }


async def _submit(cluster: Any, config: Any, jobs: int) -> tuple[list[Any], list[float], list[str], float]:
    """Submit every job, 8 at a time; kill api-a once half are accepted."""
    import signal

    from prefect import get_client

    from engine.core import JobSpec
    from irefine.submit import submit_job
    from tests.queue_scenario import submission_order

    order = submission_order(config.mix, config.seed)
    gate = asyncio.Semaphore(8)
    submitted: list[Any] = []
    latencies: list[float] = []
    failures: list[str] = []
    killed = threading.Event()
    tag = time.strftime("%H%M%S")

    async def one(client: Any, n: int, queue: str) -> None:
        async with gate:
            start = time.monotonic()
            try:
                spec = JobSpec.parse({**JOB_SPEC, "seed": n})
                done = await submit_job(client, spec, job_id=f"load-{tag}-{n:03d}-{queue}", urgency=queue)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                return
            latencies.append(time.monotonic() - start)
            submitted.append(done)
            if len(submitted) >= jobs // 2 and not killed.is_set():
                killed.set()
                log("killing api-a (kill -9 of its process group)")
                # Its CPU so far leaves the groups' sum with it: keep it for the Prefect figure.
                KILLED_CPU_S["prefect"] += group_cpu_seconds([cluster.pids["api-a"]])
                cluster.kill("api-a", signal.SIGKILL)

    started = time.monotonic()
    async with get_client() as client:
        await asyncio.gather(*(one(client, n, queue) for n, queue in enumerate(order)))
    return submitted, latencies, failures, time.monotonic() - started


if __name__ == "__main__":
    main()
