"""`irefine setup` and `prefect deploy --all` against a real Prefect server (PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
QUEUES = {"critical": (1, None), "high": (2, 4), "normal": (3, 2), "low": (4, 1)}


def _env(api_url: str | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _irefine(api_url: str | None, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "irefine", "setup", *args],
        env=_env(api_url, **extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _automation_line(line: str) -> bool:
    return line.split()[1] in ("automation", "notification-block")


def _client_call(fn: Any) -> Any:
    from prefect import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def setup_runs(prefect_api: str) -> list[subprocess.CompletedProcess[str]]:
    """`irefine setup` run twice against the session's server."""
    return [_irefine(prefect_api), _irefine(prefect_api)]


def test_setup_twice_creates_then_changes_nothing(setup_runs) -> None:
    first, second = setup_runs
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    # The automations' lines are tested in test_automations.py.
    first_lines = [line for line in first.stdout.splitlines() if not _automation_line(line)]
    assert len(first_lines) == 14  # 2 pools, 8 queues, 4 limits
    assert all(line.split()[0] in ("created", "unchanged") for line in first_lines)
    assert "created   work-pool irefine-local (type process)" in first_lines
    second_lines = second.stdout.splitlines()
    assert len([line for line in second_lines if not _automation_line(line)]) == 14
    assert {line.split()[0] for line in second_lines} == {"unchanged"}


def test_setup_objects_read_back(setup_runs, prefect_api: str) -> None:
    async def read(client: Any) -> dict[str, Any]:
        pools = {n: await client.read_work_pool(n) for n in ("irefine-local", "irefine-aks")}
        queues = {
            (p, q): await client.read_work_queue_by_name(q, work_pool_name=p) for p in pools for q in QUEUES
        }
        limits = {
            n: await client.read_global_concurrency_limit_by_name(n)
            for n in (
                "irefine-running-jobs",
                "irefine-evaluations",
                "irefine-submissions",
                "irefine-worker-poll",
            )
        }
        return {"pools": pools, "queues": queues, "limits": limits}

    got = _client_call(read)
    assert got["pools"]["irefine-local"].type == "process"
    assert got["pools"]["irefine-local"].concurrency_limit == 4  # the job limit: priority order within it
    aks = got["pools"]["irefine-aks"]
    assert aks.type == "kubernetes"
    props = aks.base_job_template["variables"]["properties"]
    assert {"cpu_request", "memory_request", "node_selector", "tolerations"} <= set(props)
    for (_, name), queue in got["queues"].items():
        assert (queue.priority, queue.concurrency_limit) == QUEUES[name]
    limits = got["limits"]
    assert (limits["irefine-running-jobs"].limit, limits["irefine-running-jobs"].slot_decay_per_second) == (
        4,
        0.0,
    )
    assert limits["irefine-evaluations"].limit == 64
    assert limits["irefine-submissions"].limit == 10
    assert limits["irefine-submissions"].slot_decay_per_second == 1.0
    assert (limits["irefine-worker-poll"].limit, limits["irefine-worker-poll"].slot_decay_per_second) == (
        1,
        0.0,
    )
    assert all(limit.active for limit in limits.values())


def test_setup_updates_a_changed_limit(setup_runs, prefect_api: str) -> None:
    from deployments.setup import run_setup

    changed = asyncio.run(run_setup(aks_pool=None, job_limit=6))
    assert changed.updated == ["work-pool irefine-local", "concurrency-limit irefine-running-jobs"]
    assert len([n for n in changed.unchanged if not _automation_line(f"- {n}")]) == 7
    restored = asyncio.run(run_setup(aks_pool=None))
    assert restored.updated == ["work-pool irefine-local", "concurrency-limit irefine-running-jobs"]


def test_setup_without_api_url_is_one_line_exit_2(tmp_path: Path) -> None:
    done = _irefine(None, PREFECT_HOME=str(tmp_path / "prefect-home"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "prefect server start" in lines[0] and "PREFECT_API_URL" in lines[0]


def test_deploy_all(setup_runs, prefect_api: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        env=_env(prefect_api, IRE_PROJECT_DIR=str(ROOT), IRE_IMAGE="example.azurecr.io/irefine:test"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    names = ("refine", "nightly-svc-retune", "refine-aks")

    async def read(client: Any) -> dict[str, Any]:
        return {n: await client.read_deployment_by_name(f"refine/{n}") for n in names}

    deps = _client_call(read)
    local, nightly, aks = (deps[n] for n in names)
    assert (local.work_pool_name, local.work_queue_name) == ("irefine-local", "normal")
    assert local.enforce_parameter_schema and local.parameters == {}
    assert local.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert (nightly.work_pool_name, nightly.work_queue_name) == ("irefine-local", "low")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["spec"]["problem"] == "svc"
    assert (aks.work_pool_name, aks.work_queue_name) == ("irefine-aks", "normal")
    assert aks.job_variables["image"] == "example.azurecr.io/irefine:test"
    assert aks.job_variables["cpu_request"] == "500m"

    # The server enforces the JobSpec schema on runs of the deployment.
    from prefect.exceptions import PrefectHTTPStatusError

    async def bad_run(client: Any) -> Any:
        return await client.create_flow_run_from_deployment(
            local.id, parameters={"spec": {"problem": "sphere", "no_such_field": 1}}
        )

    with pytest.raises(PrefectHTTPStatusError, match=r"409|422"):
        _client_call(bad_run)

    # The server's scheduler (or the deploy itself) creates the nightly runs.
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def scheduled(client: Any) -> list[Any]:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id]))
        )

    deadline = time.monotonic() + 30
    runs = _client_call(scheduled)
    while not runs and time.monotonic() < deadline:
        time.sleep(2)
        runs = _client_call(scheduled)
    assert runs and all(r.state_name == "Scheduled" for r in runs)
    assert all((r.expected_start_time.hour, r.expected_start_time.minute) == (2, 0) for r in runs)
