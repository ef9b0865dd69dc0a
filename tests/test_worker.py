"""Workers that poll in turns (deployments/worker.py) and ``irefine worker``, on the session's
Prefect server (PostgreSQL).

Each test gets a process pool of its own (limit 2, queues ``first`` priority 1 and ``second``
priority 2) and a deployment on it. The workers under test start no process for the runs they
take: what is tested is which runs a poll takes and when, which the server decides.
"""

from __future__ import annotations

import abc
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from deployments.worker import TurnTakingProcessWorker

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
POOL_LIMIT = 2


class NoProcessWorker(TurnTakingProcessWorker, abc.ABC):  # abc.ABC: see deployments/worker.py
    """A turn-taking process worker that reports each run started without starting a process."""

    async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
        from prefect.workers.process import ProcessWorkerResult

        if task_status is not None:
            task_status.started(0)
        return ProcessWorkerResult(identifier="0", status_code=0)


@dataclass(frozen=True)
class Pool:
    name: str
    deployment_id: uuid.UUID


def _call(fn: Any) -> Any:
    from prefect import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


@pytest.fixture
def pool(prefect_api: str) -> Iterator[Pool]:
    """A pool with queues ``first`` and ``second``, a deployment on it, and the poll limit."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from deployments.setup import WORKER_POLL_LIMIT, SetupReport, ensure_global_limit

    name = f"turns-{uuid.uuid4().hex[:8]}"

    async def create(client: Any) -> Pool:
        await ensure_global_limit(client, SetupReport(), WORKER_POLL_LIMIT, 1)
        await client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=POOL_LIMIT))
        for queue, priority in (("first", 1), ("second", 2)):
            await client.create_work_queue(queue, priority=priority, work_pool_name=name)
        flow_id = await client.create_flow_from_name(f"turns-flow-{name}")
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=name, work_pool_name=name, work_queue_name="second"
        )
        return Pool(name, deployment_id)

    created = _call(create)
    try:
        yield created
    finally:

        async def remove(client: Any) -> None:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[created.deployment_id])
                )
            )
            for run in runs:
                await client.delete_flow_run(run.id)
            await client.delete_deployment(created.deployment_id)
            await client.delete_work_pool(name)

        _call(remove)


async def _create_runs(client: Any, pool: Pool, queue: str, count: int) -> list[uuid.UUID]:
    runs = [
        await client.create_flow_run_from_deployment(pool.deployment_id, work_queue_name=queue)
        for _ in range(count)
    ]
    return [run.id for run in runs]


async def _states(client: Any, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    return {run_id: (await client.read_flow_run(run_id)).state.type.value for run_id in run_ids}


def _worker(pool: Pool, **options: Any) -> NoProcessWorker:
    worker = NoProcessWorker(work_pool_name=pool.name, limit=10, prefetch_seconds=10)
    for key, value in options.items():
        setattr(worker, key, value)
    return worker


def test_a_poll_waits_for_its_turn_and_leaves_its_runs_pending(pool: Pool) -> None:
    from deployments.worker import end_poll_turn, take_poll_turn

    async def go(client: Any) -> None:
        routine = await _create_runs(client, pool, "second", 2)  # older: first come, first served
        urgent = await _create_runs(client, pool, "first", 2)
        async with _worker(pool) as worker:
            lease = await take_poll_turn(client, wait_seconds=5)  # another worker's turn
            assert lease is not None
            polling = asyncio.ensure_future(worker.get_and_submit_flow_runs())
            await asyncio.sleep(1.5)
            assert not polling.done()
            assert set((await _states(client, routine + urgent)).values()) == {"SCHEDULED"}
            await end_poll_turn(client, lease)
            taken = await asyncio.wait_for(polling, 30)
            # The pool's 2 slots go to the higher-priority queue, and the runs are Pending by
            # the time the turn ends: the next worker's query counts them and skips them.
            assert {run.id for run in taken} == set(urgent)
            assert set((await _states(client, urgent)).values()) == {"PENDING"}
            assert set((await _states(client, routine)).values()) == {"SCHEDULED"}

    _call(go)


def test_two_workers_polling_at_once_take_turns(pool: Pool) -> None:
    async def go(client: Any) -> None:
        routine = await _create_runs(client, pool, "second", 3)
        urgent = await _create_runs(client, pool, "first", 3)
        async with _worker(pool) as one, _worker(pool) as two:
            taken = await asyncio.gather(one.get_and_submit_flow_runs(), two.get_and_submit_flow_runs())
        # One worker took the pool's 2 slots, from the higher-priority queue; the other, polling
        # after it, found the pool full. Without turns, both queries see 2 free slots and the
        # second skips the rows the first has locked: lower-priority runs, more than the limit.
        assert sorted(len(runs) for runs in taken) == [0, POOL_LIMIT]
        states = await _states(client, routine + urgent)
        pending = [run_id for run_id, state in states.items() if state == "PENDING"]
        assert len(pending) == POOL_LIMIT and set(pending) <= set(urgent)
        assert all(states[run_id] == "SCHEDULED" for run_id in routine)

    _call(go)


def test_a_turn_kept_by_another_worker_skips_the_poll(pool: Pool) -> None:
    from deployments.worker import end_poll_turn, take_poll_turn

    async def go(client: Any) -> None:
        urgent = await _create_runs(client, pool, "first", 1)
        lease = await take_poll_turn(client, wait_seconds=5)
        assert lease is not None
        try:
            async with _worker(pool, poll_wait_seconds=0.5) as worker:
                with anyio.fail_after(20):
                    assert await worker.get_and_submit_flow_runs() == []
            assert await _states(client, urgent) == {urgent[0]: "SCHEDULED"}
        finally:
            await end_poll_turn(client, lease)
        again = await take_poll_turn(client, wait_seconds=5)  # given back: free again
        assert again is not None
        await end_poll_turn(client, again)

    _call(go)


def test_a_poll_slot_without_a_lease_is_freed_after_the_longest_lease(pool: Pool) -> None:
    """A slot the server counted but whose lease it never stored (Redis down at that moment)
    blocks every worker; one refused for longer than any lease lives frees it and polls again."""
    from deployments.worker import POLL_LIMIT, end_poll_turn, take_poll_turn

    async def go(client: Any) -> None:
        urgent = await _create_runs(client, pool, "first", 1)
        # A plain increment: the slot is held with no lease that could release or expire it.
        await client.increment_concurrency_slots(names=[POLL_LIMIT], slots=1, mode="concurrency")
        try:
            async with _worker(pool, poll_wait_seconds=0.5) as worker:
                worker.orphan_after_seconds = 0.8
                with anyio.fail_after(30):
                    assert await worker.get_and_submit_flow_runs() == []  # refused 0.5 s
                    assert await worker.get_and_submit_flow_runs() == []  # refused 1 s: freed
                    taken = await worker.get_and_submit_flow_runs()
            assert [run.id for run in taken] == urgent
        finally:
            lease = await take_poll_turn(client, wait_seconds=5)
            assert lease is not None  # nothing left held
            await end_poll_turn(client, lease)

    _call(go)


def _irefine_worker(api_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "irefine", "worker", *args],
        env={**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_irefine_worker_run_once_polls_in_its_turn(pool: Pool, prefect_api: str) -> None:
    started = time.monotonic()
    done = _irefine_worker(prefect_api, "--pool", pool.name, "--run-once", "--name", "once")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Worker 'once' started!" in done.stdout
    assert time.monotonic() - started < 110


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pool", "no-such-pool"], "work pool 'no-such-pool' does not exist: run `irefine setup`"),
        (["--pool", "{pool}", "--type", "kubernetes"], "has type 'process'; drop --type"),
        (["--pool", "{pool}", "--limit", "0"], "--limit 0: give at least 1"),
    ],
)
def test_irefine_worker_bad_input_is_one_line_exit_2(
    pool: Pool, prefect_api: str, args: list[str], says: str
) -> None:
    done = _irefine_worker(prefect_api, *(arg.format(pool=pool.name) for arg in args))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_without_the_poll_limit_a_worker_fails_and_says_run_setup(pool: Pool, prefect_api: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from deployments.setup import WORKER_POLL_LIMIT
    from deployments.worker import PollLimitMissing, take_poll_turn

    async def poll(client: Any) -> None:
        # A worker that lost the limit while running stops polling (the error ends its loop)
        # rather than poll without turns.
        with pytest.raises(PollLimitMissing, match="run `irefine setup`"):
            await take_poll_turn(client, wait_seconds=5)
        async with _worker(pool) as worker:
            with pytest.raises(PollLimitMissing):
                await worker.get_and_submit_flow_runs()

    _call(lambda client: client.delete_global_concurrency_limit_by_name(WORKER_POLL_LIMIT))
    try:
        _call(poll)
        done = _irefine_worker(prefect_api, "--pool", pool.name)
    finally:
        _call(
            lambda client: client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=WORKER_POLL_LIMIT, limit=1)
            )
        )
    assert done.returncode == 2
    says = f"no global concurrency limit {WORKER_POLL_LIMIT!r} on the server: run `irefine setup`"
    assert done.stderr.strip() == f"irefine: error: {says}"


def test_turn_taking_workers_leave_prefects_worker_registry_alone() -> None:
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker
    from prefect_kubernetes.worker import KubernetesWorker

    from deployments.worker import PollTurns, turn_taking_kubernetes_worker

    kubernetes = turn_taking_kubernetes_worker()
    for turn_taking, prefects in ((TurnTakingProcessWorker, ProcessWorker), (kubernetes, KubernetesWorker)):
        mro = turn_taking.__mro__
        assert mro.index(PollTurns) < mro.index(prefects)  # the turn wraps Prefect's poll
        assert turn_taking.type == prefects.type  # the pool's type
        # `prefect worker start` in this process still gets Prefect's own class.
        assert BaseWorker.get_worker_class_from_type(prefects.type) is prefects
