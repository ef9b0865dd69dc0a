"""The refine flow against a real Prefect server: stages as tasks, Dask fan-out, results stored."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from engine.core import JobSpec
from engine.settings import load_settings
from engine.store import JobStatus, JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flow_runs_each_cycle_as_three_tasks_and_stores_the_job(prefect_api, ire_env, dask_address) -> None:
    from prefect import get_client

    from flows.refine import refine

    spec = JobSpec.parse(
        {
            "problem": "sphere",
            "problem_params": {"dim": 4},
            "strategy": "cmaes",
            "batch_size": 10,
            "max_cycles": 4,
            "seed": 1,
        }
    )
    state = refine(spec=spec, job_id="flow-1", dask_address=dask_address, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result.status == "completed" and result.cycles == 4 and result.evaluations == 40

    store = JobStore.from_settings(load_settings())
    rec = store.get_job("flow-1")
    store.close()
    assert rec.status is JobStatus.COMPLETED and rec.flow_run_id == str(state.state_details.flow_run_id)

    async def task_names() -> list[str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            return sorted(r.name for r in runs if r.name != "describe-problem")

    names: list[str] = []
    for _ in range(120):  # task runs reach the server through events: give them a moment
        names = asyncio.run(task_names())
        if len(names) >= 12:
            break
        asyncio.run(asyncio.sleep(0.5))
    expected = sorted(f"{stage}-{c}" for c in range(1, 5) for stage in ("propose", "evaluate", "record"))
    assert names == expected


def test_flow_resumes_a_job_by_id(prefect_api, ire_env) -> None:
    from flows.refine import refine

    spec = JobSpec.parse(
        {
            "problem": "sphere",
            "problem_params": {"dim": 2},
            "strategy": "random",
            "batch_size": 5,
            "max_evaluations": 20,
        }
    )
    first = refine(spec=spec.model_copy(update={"max_evaluations": 10}), job_id="flow-2", executor="local")
    assert first.evaluations == 10
    # A completed job cannot be resumed; a failed flow says so.
    state = refine(job_id="flow-2", executor="local", return_state=True)
    assert state.is_failed() and "already completed" in str(
        state.message or state.result(raise_on_failure=False)
    )
    # A rerun with the same spec and id (a flow run resumed after its process died once the job
    # had completed) returns the stored result; another spec under that id is refused.
    again = refine(spec=spec.model_copy(update={"max_evaluations": 10}), job_id="flow-2", executor="local")
    assert again.status == "completed" and again.evaluations == 10
    assert again.best_score == first.best_score
    other = refine(spec=spec, job_id="flow-2", executor="local", return_state=True)
    assert other.is_failed() and "another spec" in str(other.message or other.result(raise_on_failure=False))


def test_a_refused_job_starts_no_executor(prefect_api, ire_env) -> None:
    """The flow opens the job before it starts its executor: a spec refused under an existing job
    id fails with that refusal, without trying the Dask scheduler (one nobody listens on here,
    which would fail the run with a connection error instead)."""
    from flows.refine import refine
    from tests.prefect_server import free_port

    spec = JobSpec.parse({"problem": "sphere", "strategy": "random", "batch_size": 4, "max_evaluations": 8})
    first = refine(spec=spec, job_id="flow-refused", executor="local")
    assert first.status == "completed"
    nobody = f"tcp://127.0.0.1:{free_port()}"
    other = spec.model_copy(update={"max_evaluations": 12})
    state = refine(spec=other, job_id="flow-refused", dask_address=nobody, return_state=True)
    assert state.is_failed() and "another spec" in str(state.message or state.result(raise_on_failure=False))


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return {r.name: r.state.name for r in runs if r.state is not None}

    for _ in range(120):  # task-run states reach the server through events
        states = asyncio.run(read())
        if "describe-problem" in states and states["describe-problem"] in ("Completed", "Cached"):
            return states
        asyncio.run(asyncio.sleep(0.5))
    return states


@pytest.mark.parametrize("storage", ["local", "redis"])
def test_problem_description_is_persisted_and_reused_across_runs(
    storage: str, prefect_api, ire_env, redis_server, monkeypatch
) -> None:
    from flows.refine import refine

    # A cache key of this test run's own: local results outlive the run (under ~/.prefect).
    version = f"persist-{storage}-{uuid.uuid4().hex[:8]}"
    params = {"dim": 3, "version": version}
    if storage == "redis":
        import redis
        from prefect_redis import RedisDatabase

        RedisDatabase(host="127.0.0.1", port=redis_server.port, db=3).save("ire-test-results", overwrite=True)
        monkeypatch.setenv("IRE_RESULT_STORAGE", "redis-database/ire-test-results")
        redis.Redis(port=redis_server.port, db=3).flushdb()
    runs = []
    for i in range(2):
        spec = JobSpec.parse({"problem": "sphere", "problem_params": params, "strategy": "random",
                              "batch_size": 4, "max_evaluations": 8})  # fmt: skip
        state = refine(spec=spec, job_id=f"persist-{storage}-{i}", executor="local", return_state=True)
        assert state.is_completed()
        assert state.result().status == "completed"
        runs.append(_task_states(state.state_details.flow_run_id))
    assert runs[0]["describe-problem"] == "Completed"
    assert runs[1]["describe-problem"] == "Cached"
    if storage == "redis":
        import redis

        assert redis.Redis(port=redis_server.port, db=3).dbsize() >= 1  # the result lives in Redis


def test_run_refine_turns_the_flow_heartbeat_off_for_its_call_only(prefect_api) -> None:
    from prefect.settings import get_current_settings

    from flows.refine import _without_flow_heartbeat

    before = get_current_settings()
    assert before.flows.heartbeat_frequency is not None  # Prefect 3.9's default: 180 s
    with _without_flow_heartbeat():
        inside = get_current_settings()
        assert inside.flows.heartbeat_frequency is None
        assert inside.api.url == before.api.url  # every other setting kept
        assert inside.flows.model_dump(exclude={"heartbeat_frequency"}) == before.flows.model_dump(
            exclude={"heartbeat_frequency"}
        )
    assert get_current_settings().flows.heartbeat_frequency == before.flows.heartbeat_frequency


def test_deployment_id_reads_the_run_context_not_the_api(prefect_api, ire_env) -> None:
    from prefect import flow

    from flows.refine import deployment_id

    @flow
    def probe() -> str | None:
        return deployment_id()

    assert deployment_id() is None  # outside any flow run
    assert probe() is None  # a flow run without a deployment
