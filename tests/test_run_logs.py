"""Log lines of a deployment run carry the job id from the run's first line to its last.

A run created from the ``refine`` deployment with a spec and no job id names its job
``run-<flow run id>``; Prefect's engine knows that as soon as the run starts, so every line must
say so -- the engine's own "Beginning flow run" and "Finished in state" too -- in the JSON
console lines and in the run logs the Prefect API keeps. The run is executed as a worker does
(``prefect flow-run execute``), on the session's Prefect server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"problem": "sphere", "strategy": "random", "batch_size": 4, "max_cycles": 2, "seed": 1}


async def _deployment_run(client: Any, parameters: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """A flow run of a fresh deployment of the refine flow (with ``parameters``, default: SPEC run
    in process), and the global limits made for it."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from flows.limits import EVALUATIONS_LIMIT, RUNNING_JOBS_LIMIT

    created = []
    for name in (RUNNING_JOBS_LIMIT, EVALUATIONS_LIMIT):  # the run takes slots of both
        try:
            await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=4))
            created.append(name)
    flow_id = await client.create_flow_from_name("refine")
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=f"run-logs-{uuid.uuid4().hex[:8]}",
        entrypoint="flows/refine.py:refine",
        path=str(ROOT),
    )
    parameters = parameters or {"spec": SPEC, "executor": "local"}
    run = await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    return run, created


async def _cleanup(client: Any, run: Any, limits: list[str]) -> None:
    await client.delete_deployment(run.deployment_id)
    for name in limits:
        await client.delete_global_concurrency_limit_by_name(name)


async def _api_messages(client: Any, flow_run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]


def test_deployment_run_logs_carry_the_job_id_from_the_first_line(
    prefect_api: str, ire_env: dict[str, str]
) -> None:
    from prefect import get_client

    async def create() -> tuple[Any, list[str]]:
        async with get_client() as client:
            return await _deployment_run(client)

    run, limits = asyncio.run(create())
    job_id = f"run-{run.id}"
    try:
        env = {
            **ire_env,
            "PREFECT_API_URL": prefect_api,
            "IRE_LOG_FORMAT": "json",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
        }
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "flow-run", "execute", str(run.id)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        in_run = [line for line in lines if line["flow_run_id"]]
        assert in_run, done.stderr[-3000:]
        assert all(line["job_id"] == job_id for line in in_run), in_run
        assert any(line["message"].startswith(f"job {job_id}: sphere") for line in in_run), in_run

        async def messages() -> list[str]:
            async with get_client() as client:
                return await _api_messages(client, run.id)

        found: list[str] = []
        for _ in range(60):  # run logs reach the server in batches
            found = asyncio.run(messages())
            if any(m.startswith(f"[job {job_id}] job {job_id}: sphere") for m in found) and any(
                m.startswith(f"[job {job_id}] Finished in state") for m in found
            ):
                break
            time.sleep(0.5)
        # Prefect's own lines about the run carry the job too, from its first to its last; only
        # the worker's download of the flow code comes before the run is known.
        run_lines = [m for m in found if not m.startswith("Downloading flow code")]
        assert any(m.startswith(f"[job {job_id}] job {job_id}: sphere") for m in run_lines), found
        assert any(m.startswith(f"[job {job_id} cycle 2] ") for m in run_lines), found
        assert run_lines[0].startswith(f"[job {job_id}] Beginning flow run"), found
        assert any(m.startswith(f"[job {job_id}] Finished in state Completed") for m in run_lines), found
        assert all(m.startswith(f"[job {job_id}") for m in run_lines), found
    finally:

        async def cleanup() -> None:
            async with get_client() as client:
                await _cleanup(client, run, limits)

        asyncio.run(cleanup())
