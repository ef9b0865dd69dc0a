"""``irefine cluster`` on a real topology (PostgreSQL primary + replica, Redis, two Prefect API
replicas behind HAProxy, two services processes, supervised Dask, two worker nodes), and three
fault drills on it: an API replica killed, a lost node, Redis stopped. One cluster for the module;
the last test takes it down and checks that no process is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from deployments.cluster import Cluster
from deployments.cluster.drills import DRILLS, Fault, _redis_down, run_drill

# The module fixture brings a whole cluster up (2-4 min on a loaded 2-core machine) in the first test.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
DRILL_JOBS = 2
DRILL_CYCLES = 12  # long enough that every job is still running when the fault hits


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, "-m", "irefine", "cluster", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="ire-cluster-test-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as its own user
    folder = base / "cluster"
    # The drills' jobs run tests.problems_for_tests through deployment runs: the operator's
    # allow-list (IRE_PROBLEM_MODULES) must name the module, for `irefine submit` and the nodes.
    allow = pytest.MonkeyPatch()
    allow.setenv("IRE_PROBLEM_MODULES", "tests")
    try:
        done = _cli("--dir", str(folder), "up", "--port", "0", timeout=600)
        running = Cluster(folder)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "cluster up in" in done.stdout
        yield running
    finally:
        Cluster(folder).down()  # also after a timed-out `up`: the parts it started are in its state
        shutil.rmtree(base, ignore_errors=True)
        allow.undo()


def _assert_drill(figures: dict[str, Any], recovery_limit: float) -> None:
    assert figures["jobs_started"] == DRILL_JOBS, figures
    assert figures["jobs_completed"] == DRILL_JOBS, figures
    assert figures["jobs_running_at_fault"] == DRILL_JOBS, figures  # the fault hit every job
    assert figures["results_equal"] is True, figures
    assert figures["evaluations_lost"] == 0, figures
    assert figures["duplicate_cycles"] == 0, figures
    assert figures["recovery_s"] is not None and figures["recovery_s"] <= recovery_limit, figures


def _set_automation(cluster: Cluster, knob: str, value: timedelta) -> None:
    """Give the automation that ``knob`` of the policy drives a shorter timeout on the cluster."""
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.automations import (
        CRASH_SILENT,
        STUCK_PENDING,
        AutomationPolicy,
        automation_specs,
        ensure_automation,
    )
    from deployments.setup import SetupReport

    name = {"heartbeat_timeout": CRASH_SILENT, "pending_timeout": STUCK_PENDING}[knob]
    wanted = next(a for a in automation_specs(None, AutomationPolicy(**{knob: value})) if a.name == name)

    async def go() -> None:
        async with get_client() as client:
            await ensure_automation(client, SetupReport(), wanted, "test")

    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
        asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as another user only when we are root")
def test_up_refuses_a_folder_postgres_cannot_reach(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    done = _cli("--dir", str(hidden / "cluster"), "up", "--port", "0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not searchable" in done.stderr and "--dir" in done.stderr
    assert not (hidden / "cluster").exists()  # nothing written


def test_status_reports_every_part(cluster: Cluster) -> None:
    done = _cli("--dir", str(cluster.folder), "status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    parts = {p["name"]: p for p in report["parts"]}
    expected = {"postgres-a", "postgres-b", "redis", "api-a", "api-b", "balancer", "services-a"}
    expected |= {"services-b", "dask", "dask-scheduler", "dask-worker-0", "dask-worker-1"}
    expected |= {"node-a", "node-b"}
    assert set(parts) == expected
    assert all(p["health"] == "ok" and p["pid"] for p in parts.values()), parts
    assert parts["postgres-a"]["role"] == "primary" and parts["postgres-b"]["role"] == "replica"
    assert parts["api-a"]["role"] == "balancer: UP" and parts["api-b"]["role"] == "balancer: UP"
    assert report["api_url"] == cluster.api_url and parts["balancer"]["address"] in cluster.api_url


def test_up_refuses_a_running_cluster_and_bad_ports(cluster: Cluster) -> None:
    again = _cli("--dir", str(cluster.folder), "up", "--port", "0")
    assert again.returncode == 1 and "already runs" in again.stdout
    bad = _cli("--dir", str(cluster.folder), "up", "--port", "70000")
    assert bad.returncode == 2 and "--port 70000" in bad.stderr
    assert cluster.health("api-a") == "ok"  # the running cluster is untouched


def test_drill_api_replica_kill(cluster: Cluster) -> None:
    figures = run_drill(
        cluster, "api_replica_kill", DRILLS["api_replica_kill"], jobs=DRILL_JOBS, cycles=DRILL_CYCLES
    )
    _assert_drill(figures, recovery_limit=30)
    assert cluster.health("api-a") == "ok"  # repaired for the next drill


def test_drill_lost_node(cluster: Cluster) -> None:
    # The node's flow-run processes die with it, so nobody reports their runs Crashed: the
    # crash-silent automation does after a heartbeat timeout, here 60 s (two of the runs' 30-s
    # heartbeats) instead of setup's 90 s, then the resume automation reschedules them.
    _set_automation(cluster, "heartbeat_timeout", timedelta(seconds=60))
    figures = run_drill(cluster, "node_loss", DRILLS["node_loss"], jobs=DRILL_JOBS, cycles=DRILL_CYCLES)
    _assert_drill(figures, recovery_limit=150)
    assert cluster.health("node-a") == "ok" and cluster.health("node-b") == "ok"


def test_drill_redis_stop(cluster: Cluster) -> None:
    # 10 s down instead of the benchmark's 30 s: the same path (AOF reload, clients reconnect).
    # While Redis is down the API answers 500 to lease calls (lease storage is in Redis): a flow
    # whose slot release fails exits, its worker reports it Crashed, the triggers (reconnected
    # by themselves) see it and the resume automation reruns it from its checkpoint 20 s later;
    # a poll slot the server counted without storing its lease is freed by the worker that asked.
    fault = Fault(_redis_down(10.0))
    figures = run_drill(cluster, "redis_stop", fault, jobs=DRILL_JOBS, cycles=DRILL_CYCLES)
    _assert_drill(figures, recovery_limit=150)


def test_run_stuck_in_pending_is_rescheduled(cluster: Cluster) -> None:
    """A run a worker claimed (Pending) and never started (the worker died: upstream #18933) is
    rescheduled by the automation and then run by a live worker."""
    import asyncio
    from datetime import timedelta

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from deployments.automations import STUCK_PENDING, AutomationPolicy, automation_specs, ensure_automation
    from deployments.setup import SetupReport

    policy = AutomationPolicy(pending_timeout=timedelta(seconds=15))
    wanted = next(a for a in automation_specs(None, policy) if a.name == STUCK_PENDING)
    spec = {"problem": "tests.problems_for_tests:Slow", "strategy": "random", "batch_size": 2,
            "max_cycles": 2, "seed": 5}  # fmt: skip

    async def go() -> list[str]:
        async with get_client() as client:
            await ensure_automation(client, SetupReport(), wanted, "test")
            deployment = await client.read_deployment_by_name("refine/refine")
            run = await client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"spec": spec, "job_id": "stuck-pending-1"},
                work_queue_name="normal",
                state=Pending(),
            )
            names = []
            for _ in range(240):  # the automation fires after 15 s; the run then takes a while
                state = (await client.read_flow_run(run.id)).state
                assert state is not None
                if not names or names[-1] != state.name:
                    names.append(state.name)
                if state.is_final():
                    break
                await asyncio.sleep(1)
            return names

    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
        names = asyncio.run(go())
    assert names[0] == "Pending" and "AwaitingRetry" in names and names[-1] == "Completed", names


def test_down_leaves_no_process(cluster: Cluster) -> None:
    done = _cli("--dir", str(cluster.folder), "down")
    assert done.returncode == 0 and "no process left" in done.stdout, done.stdout + done.stderr
    assert cluster.leftovers() == []
    status = _cli("--dir", str(cluster.folder), "status", "--json")
    assert status.returncode == 1
    assert all(p["health"] == "down" for p in json.loads(status.stdout)["parts"])
