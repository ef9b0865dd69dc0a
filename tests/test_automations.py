"""The automations `irefine setup` creates, against the session's real Prefect server (PostgreSQL):
notifications reach a webhook receiver on a loopback port, a failure burst pauses its queue, a
missed deadline alerts, and a killed job's flow run is resumed by a process worker to the result
of an uninterrupted run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.automations import (
    ANOMALY_ALERT,
    CRASH_SILENT,
    DEADLINE_ALERT,
    NOTIFY_BLOCK,
    PAUSE_ON_FAILURES,
    RESUME_CRASHED,
    STUCK_PENDING,
    AutomationPolicy,
    automation_specs,
)

ROOT = Path(__file__).resolve().parent.parent
AUTOMATIONS = (RESUME_CRASHED, CRASH_SILENT, STUCK_PENDING, PAUSE_ON_FAILURES, DEADLINE_ALERT, ANOMALY_ALERT)
SLOW = "tests.problems_for_tests:Slow"


class WebhookReceiver:
    """A tiny HTTP server on a loopback port that keeps the JSON body of every POST."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/irefine"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.received):
                if predicate(message):
                    return message
            time.sleep(0.2)
        raise AssertionError(f"no matching notification within {timeout:.0f} s; got {self.received}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _client_call(fn: Callable[[Any], Any]) -> Any:
    from prefect import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def _setup(**options: Any) -> Any:
    from deployments.setup import run_setup

    return asyncio.run(run_setup(aks_pool=None, **options))


def _read_events(api_url: str, event: str, resource_id: str) -> list[dict[str, Any]]:
    """The stored events named ``event`` about ``resource_id`` (the REST API's events filter)."""
    body = {"filter": {"event": {"name": [event]}, "resource": {"id": [resource_id]}}, "limit": 50}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return list(response.json()["events"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def setup_twice(prefect_api: str, receiver: WebhookReceiver) -> Iterator[list[Any]]:
    """Setup (pools, queues, limits, automations, the webhook block) run twice. On teardown what
    this module added to the session's server goes again: the automations and the block (later
    runs must not notify a closed port), and the pool irefine-local with the ``refine`` deployment
    when this module created them (test_setup.py expects to create the pool)."""
    reports = [_setup(notify_webhook_url=receiver.url), _setup(notify_webhook_url=receiver.url)]
    yield reports
    created_pool = ("work-pool", "irefine-local", "created") in {
        (i.kind, i.name, i.outcome) for i in reports[0].items
    }

    async def remove(client: Any) -> None:
        from prefect.exceptions import ObjectNotFound

        for name in AUTOMATIONS:
            for automation in await client.read_automations_by_name(name):
                await client.delete_automation(automation.id)
        block = await client.read_block_document_by_name(NOTIFY_BLOCK, block_type_slug="custom-webhook")
        await client.delete_block_document(block.id)
        if created_pool:
            with contextlib.suppress(ObjectNotFound):
                deployment = await client.read_deployment_by_name("refine/refine")
                await client.delete_deployment(deployment.id)
            await client.delete_work_pool("irefine-local")

    _client_call(remove)


# -- setup ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_setup_twice_second_run_changes_nothing(setup_twice: list[Any]) -> None:
    first, second = setup_twice
    ours = [i for i in first.items if i.kind in ("automation", "notification-block")]
    assert [(i.kind, i.name) for i in ours] == [("notification-block", NOTIFY_BLOCK)] + [
        ("automation", name) for name in AUTOMATIONS
    ]
    assert all(i.outcome in ("created", "unchanged") for i in ours)
    assert "127.0.0.1" in ours[0].detail and "hooks" not in ours[0].detail  # the path may hold a token
    assert len(second.items) == len(first.items)
    assert second.created == [] and second.updated == [], [i.line() for i in second.items]


@pytest.mark.integration
def test_automations_read_back(setup_twice: list[Any]) -> None:
    async def read(client: Any) -> dict[str, Any]:
        return {name: await client.read_automations_by_name(name) for name in AUTOMATIONS}

    found = _client_call(read)
    assert all(len(copies) == 1 and copies[0].enabled for copies in found.values())
    actions = {name: [a.type for a in copies[0].actions] for name, copies in found.items()}
    assert actions == {
        RESUME_CRASHED: ["change-flow-run-state", "send-notification"],
        CRASH_SILENT: ["change-flow-run-state"],
        STUCK_PENDING: ["change-flow-run-state"],
        PAUSE_ON_FAILURES: ["pause-work-queue", "send-notification"],
        DEADLINE_ALERT: ["send-notification"],
        ANOMALY_ALERT: ["send-notification"],
    }
    resume = found[RESUME_CRASHED][0].trigger
    assert resume.posture == "Proactive" and resume.after == {"prefect.flow-run.Crashed"}
    assert resume.match.root["prefect.run-count"] == ["1", "2", "3"]  # the cap: 3 resumes
    silent = found[CRASH_SILENT][0].trigger
    assert silent.posture == "Proactive" and silent.within.total_seconds() == 90
    assert silent.after == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}


@pytest.mark.integration
def test_setup_restores_an_edited_automation(setup_twice: list[Any], receiver: WebhookReceiver) -> None:
    async def edit(client: Any) -> None:
        (automation,) = await client.read_automations_by_name(PAUSE_ON_FAILURES)
        await client.pause_automation(automation.id)

    _client_call(edit)
    report = _setup(notify_webhook_url=receiver.url)
    assert report.updated == [f"automation {PAUSE_ON_FAILURES}"]

    async def read(client: Any) -> Any:
        return (await client.read_automations_by_name(PAUSE_ON_FAILURES))[0]

    restored = _client_call(read)
    # An update sent as Prefect's client does (exclude_unset) would have turned this action into
    # run-deployment: it must still pause the queue.
    assert restored.enabled and [a.type for a in restored.actions] == [
        "pause-work-queue",
        "send-notification",
    ]
    # A later setup without a URL keeps the webhook block it has.
    again = _setup()
    assert again.updated == [] and f"notification-block {NOTIFY_BLOCK}" in again.unchanged


def test_without_a_webhook_the_alerts_have_no_notification() -> None:
    specs = {spec.name: spec for spec in automation_specs(None, AutomationPolicy(max_crash_resumes=2))}
    assert [a.type for a in specs[DEADLINE_ALERT].actions] == ["do-nothing"]
    assert [a.type for a in specs[ANOMALY_ALERT].actions] == ["do-nothing"]
    assert [a.type for a in specs[PAUSE_ON_FAILURES].actions] == ["pause-work-queue"]
    assert [a.type for a in specs[RESUME_CRASHED].actions] == ["change-flow-run-state"]
    assert specs[RESUME_CRASHED].trigger.match.root["prefect.run-count"] == ["1", "2"]


@pytest.mark.integration
def test_setup_bad_webhook_is_one_line_exit_2(prefect_api: str) -> None:
    from tests.prefect_project import irefine

    done = irefine(prefect_api, "setup", "--no-aks", "--notify-webhook", "ftp://example/hook")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--notify-webhook" in lines[0] and "http" in lines[0], done.stderr
    assert done.stdout == ""  # nothing was set up


# -- notifications -------------------------------------------------------------------------------


@pytest.mark.integration
def test_anomaly_event_notifies(setup_twice: list[Any], receiver: WebhookReceiver) -> None:
    from prefect.events import emit_event

    job_id = f"anomaly-{uuid.uuid4().hex[:8]}"
    emit_event(
        "refinement.anomaly.stall",
        resource={"prefect.resource.id": f"irefine.job.{job_id}", "prefect.resource.name": job_id},
        payload={
            "cycle": 12,
            "evidence": {"cycles_without_improvement": 9},
            "message": "no progress for 9 cycles",
        },
    )
    message = receiver.wait_for(lambda m: job_id in m["subject"])
    assert message["source"] == "irefine"
    assert message["subject"] == f"irefine: stall anomaly in job {job_id}"
    assert "cycle 12: no progress for 9 cycles" in message["body"]
    assert '"cycles_without_improvement": 9' in message["body"]


@pytest.mark.integration
@pytest.mark.slow
def test_deadline_missed_event_and_notification(
    setup_twice: list[Any], receiver: WebhookReceiver, prefect_api: str, ire_env: dict[str, str]
) -> None:
    from prefect.events import emit_event

    from flows.deadline import DEADLINE_EVENT, deadline_event_id
    from flows.refine import run_refine
    from tests.prefect_server import drain_prefect

    base = {"problem": SLOW, "strategy": "random", "batch_size": 2, "cache": "off", "seed": 1}
    in_time, late = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("in-time", "late"))
    # Done long before its deadline: no alert.
    far = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    done = run_refine(
        spec={**base, "problem_params": {"ms": 1}, "max_evaluations": 4, "deadline": far},
        job_id=in_time,
        executor="local",
    )
    assert done.status == "completed" and done.stop_reason.startswith("max evaluations")
    # Still searching when its deadline passes: stops by the deadline rule, and alerts.
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    result = run_refine(
        spec={**base, "problem_params": {"ms": 100}, "max_evaluations": 100_000, "deadline": soon},
        job_id=late,
        executor="local",
    )
    assert result.stop_reason.startswith("deadline reached")
    message = receiver.wait_for(lambda m: late in m["subject"])
    assert message["subject"] == f"irefine: job {late} missed its deadline"
    assert "passed before the end of its run" in message["body"]

    # The server stores events in batches (every few seconds), after the automations saw them.
    deadline = time.monotonic() + 60
    while not (events := _read_events(prefect_api, DEADLINE_EVENT, f"irefine.job.{late}")):
        assert time.monotonic() < deadline, "the deadline event was not stored within 60 s"
        time.sleep(0.5)
    assert len(events) == 1
    (event,) = events
    assert event["payload"]["job_id"] == late and event["payload"]["deadline"] == soon
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])
    assert _read_events(prefect_api, DEADLINE_EVENT, f"irefine.job.{in_time}") == []

    # A resumed run that emits it again (same event id) is neither stored nor notified twice.
    emit_event(
        DEADLINE_EVENT,
        resource={"prefect.resource.id": f"irefine.job.{late}", "prefect.resource.name": late},
        payload={"message": "again"},
        id=deadline_event_id(late),
    )
    drain_prefect()
    time.sleep(12)  # two of the server's event-store flushes
    assert len(_read_events(prefect_api, DEADLINE_EVENT, f"irefine.job.{late}")) == 1
    assert sum(late in m["subject"] for m in receiver.received) == 1


# -- flow runs on a process worker ---------------------------------------------------------------


@pytest.fixture(scope="module")
def refine_deployment(setup_twice: list[Any], prefect_api: str) -> None:
    """The ``refine`` deployment of prefect.yaml on irefine-local."""
    from tests.prefect_project import deploy

    deploy(prefect_api, "refine")


@pytest.fixture(scope="module")
def process_worker(
    refine_deployment: None, prefect_api: str, postgres_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A process worker of irefine-local whose flow runs keep their jobs in a PostgreSQL store
    this test process reads too."""
    from tests.prefect_project import ProcessWorker

    home = tmp_path_factory.mktemp("automations")
    store_env = {"IRE_DATABASE_URL": postgres_server.new_database(), "IRE_HOME": str(home / "ire-home")}
    worker = ProcessWorker(
        prefect_api,
        "irefine-local",
        limit=4,
        log_path=home / "worker.log",
        env={**store_env, "PYTHONPATH": str(ROOT)},
        name=f"automations-{uuid.uuid4().hex[:6]}",
    )
    try:
        yield store_env
    finally:
        worker.stop()


def _create_runs(parameters: dict[str, Any], queue: str, count: int = 1) -> list[Any]:
    async def create(client: Any) -> list[Any]:
        deployment = await client.read_deployment_by_name("refine/refine")
        return [
            await client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters, work_queue_name=queue
            )
            for _ in range(count)
        ]

    return list(_client_call(create))


def _read_run(flow_run_id: Any) -> Any:
    return _client_call(lambda client: client.read_flow_run(flow_run_id))


def _states(flow_run_id: Any) -> list[str]:
    return [s.name for s in _client_call(lambda client: client.read_flow_run_states(flow_run_id))]


def _wait_run(flow_run_id: Any, done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _read_run(flow_run_id)
        if done(run):
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not {what} within {timeout:.0f} s: {_states(flow_run_id)}")


def _queue(name: str) -> Any:
    return _client_call(lambda client: client.read_work_queue_by_name(name, work_pool_name="irefine-local"))


@contextlib.contextmanager
def _paused_queue(name: str) -> Iterator[None]:
    """The queue paused for the block (no worker takes its runs), then resumed."""
    queue = _queue(name)
    _client_call(lambda client: client.update_work_queue(queue.id, is_paused=True))
    try:
        yield
    finally:
        _client_call(lambda client: client.update_work_queue(queue.id, is_paused=False))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failure_burst_pauses_the_queue_and_notifies(
    process_worker: dict[str, str], receiver: WebhookReceiver
) -> None:
    # Every evaluation fails and the job tolerates none: each run fails in its first cycle.
    failing = {
        "spec": {
            "problem": "tests.problems_for_tests:Flaky",
            "problem_params": {"fail_every": 1},
            "strategy": "random",
            "batch_size": 2,
            "max_evaluations": 4,
            "max_failure_share": 0.0,
            "cache": "off",
        },
        "executor": "local",
    }
    burst = AutomationPolicy().failure_burst
    runs = _create_runs(failing, "low", burst)
    try:
        for run in runs:
            final = _wait_run(run.id, lambda r: r.state is not None and r.state.is_final(), 240, "final")
            assert final.state_name == "Failed", _states(run.id)
            assert "max_failure_share" in (final.state.message or "")
        message = receiver.wait_for(lambda m: "queue low paused" in m["subject"])
        assert f"{burst} refine runs failed or crashed on queue low of pool irefine-local" in message["body"]
        assert "prefect work-queue resume low --pool irefine-local" in message["body"]
        assert _queue("low").is_paused
        assert not _queue("normal").is_paused  # one count per queue
    finally:
        low = _queue("low")
        _client_call(lambda client: client.update_work_queue(low.id, is_paused=False))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_deployment_run_naming_subprocess_popen_is_refused_and_runs_nothing(
    process_worker: dict[str, str], tmp_path: Path
) -> None:
    """Whoever may create flow runs may not run commands on the workers (issue 13): the spec's
    module is not allow-listed (the worker allows IRE_PROBLEM_MODULES=tests), so nothing is imported,
    called or stored."""
    from engine.core import JobNotFoundError
    from engine.store import JobStore

    marker = tmp_path / "popen-ran"
    spec = {
        "problem": "subprocess:Popen",
        "problem_params": {"args": f"touch {marker}", "shell": True},
        "max_evaluations": 4,
    }
    job_id = f"popen-{uuid.uuid4().hex[:8]}"
    (run,) = _create_runs({"spec": spec, "job_id": job_id, "executor": "local"}, "normal")
    final = _wait_run(run.id, lambda r: r.state is not None and r.state.is_final(), 240, "final")
    assert final.state_name == "Failed", _states(run.id)
    assert "module 'subprocess' is not allowed" in (final.state.message or ""), final.state.message
    time.sleep(0.5)
    assert not marker.exists()
    store = JobStore(process_worker["IRE_DATABASE_URL"])
    try:
        with pytest.raises(JobNotFoundError):
            store.get_job(job_id, fresh=True)
    finally:
        store.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_job_is_resumed_to_the_uninterrupted_result(
    process_worker: dict[str, str], receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.core import JobNotFoundError, JobSpec
    from engine.store import JobStatus, JobStore
    from flows.refine import run_refine

    spec = {
        "problem": SLOW,
        "problem_params": {"ms": 150},
        "strategy": "cmaes",
        "batch_size": 4,
        "max_evaluations": 64,
        "seed": 11,
        "cache": "off",
    }
    job_id = f"killed-{uuid.uuid4().hex[:8]}"
    (run,) = _create_runs({"spec": spec, "job_id": job_id, "executor": "local"}, "normal")
    store = JobStore(process_worker["IRE_DATABASE_URL"])
    try:
        running = _wait_run(
            run.id, lambda r: r.state_name == "Running" and r.infrastructure_pid, 240, "running"
        )
        pid = int(str(running.infrastructure_pid).rsplit(":", 1)[-1])
        cycles, error = 0, None
        deadline = time.monotonic() + 120
        while cycles < 2 and time.monotonic() < deadline:  # at least one committed cycle
            try:
                cycles = store.get_job(job_id, fresh=True).cycles
            except JobNotFoundError as exc:  # not created yet
                error = exc
            time.sleep(0.1)
        assert 2 <= cycles < 16, f"job at cycle {cycles} ({error}): cannot kill it mid-run"
        os.kill(pid, signal.SIGKILL)  # the flow run's own process; the worker lives on

        final = _wait_run(run.id, lambda r: r.state_name == "Completed", 300, "completed after its crash")
        states = _states(run.id)
        assert "Crashed" in states and "AwaitingRetry" in states, states
        assert states.index("AwaitingRetry") > states.index("Crashed")
        assert final.run_count == 2 and states.count("Running") == 2, states
        resumed = receiver.wait_for(lambda m: run.name in m["subject"] and "rescheduled" in m["subject"])
        assert "crashed on run 1" in resumed["body"]

        record = store.get_job(job_id, fresh=True)
        assert record.status is JobStatus.COMPLETED and record.evaluations == 64
    finally:
        store.close()

    # The same spec run without interruption, in this process on the same store.
    monkeypatch.setenv("IRE_DATABASE_URL", process_worker["IRE_DATABASE_URL"])
    monkeypatch.setenv("IRE_HOME", process_worker["IRE_HOME"])
    reference = run_refine(spec=JobSpec.parse(spec), job_id=f"{job_id}-reference", executor="local")
    assert reference.best_score == record.best_score
    assert reference.best_candidate == record.best_candidate


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crash_resumes_are_capped(refine_deployment: None, receiver: WebhookReceiver) -> None:
    """With a cap of 1 (and the shortest settle time), a run that crashed on its first start is
    rescheduled, and after crashing on its second it stays Crashed. The states are set through the
    API (the server emits the same events as for a worker's run) on a paused queue, so no worker
    takes the rescheduled run."""
    from prefect.states import Crashed, Running

    policy = AutomationPolicy(max_crash_resumes=1, crash_settle=timedelta(seconds=10))
    _setup(notify_webhook_url=receiver.url, automation_policy=policy)
    try:
        with _paused_queue("critical"):
            spec = {"problem": SLOW, "max_evaluations": 4}
            (run,) = _create_runs({"spec": spec, "executor": "local"}, "critical")

            def crash() -> None:
                async def go(client: Any) -> None:
                    await client.set_flow_run_state(run.id, Running(), force=True)
                    await client.set_flow_run_state(run.id, Crashed(message="killed by the test"), force=True)

                _client_call(go)

            crash()
            rescheduled = _wait_run(run.id, lambda r: r.state_name == "AwaitingRetry", 90, "rescheduled")
            assert rescheduled.run_count == 1
            crash()
            assert _read_run(run.id).run_count == 2
            time.sleep(policy.crash_settle.total_seconds() + 12)  # past the settle and the next evaluation
            final = _read_run(run.id)
            assert final.state_name == "Crashed", _states(run.id)
            assert _states(run.id).count("AwaitingRetry") == 1
    finally:
        _setup(notify_webhook_url=receiver.url)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_that_stops_heartbeating_is_marked_crashed_and_resumed(
    refine_deployment: None, receiver: WebhookReceiver
) -> None:
    """A Running deployment run that sends no heartbeat for the timeout is marked Crashed by the
    automation, and the resume automation then reschedules it. The run is set Running through the
    API (the server emits the same event as for a worker's run) on a paused queue, and nothing
    heartbeats for it: a hung process."""
    from prefect.states import Running

    policy = AutomationPolicy(heartbeat_timeout=timedelta(seconds=10), crash_settle=timedelta(seconds=10))
    _setup(notify_webhook_url=receiver.url, automation_policy=policy)
    try:
        with _paused_queue("critical"):
            spec = {"problem": SLOW, "max_evaluations": 4}
            (run,) = _create_runs({"spec": spec, "executor": "local"}, "critical")
            _client_call(lambda client: client.set_flow_run_state(run.id, Running(), force=True))
            _wait_run(
                run.id, lambda r: r.state_name == "AwaitingRetry", 120, "marked crashed, then rescheduled"
            )
            states = _states(run.id)
            assert states.index("Crashed") < states.index("AwaitingRetry"), states
    finally:
        _setup(notify_webhook_url=receiver.url)


def test_every_deployment_heartbeats_for_the_silent_run_automation() -> None:
    """The automation needs heartbeats: prefect.yaml turns them on for each deployment's runs, at an
    interval that fits three times into the default timeout."""
    import yaml

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    timeout = AutomationPolicy().heartbeat_timeout.total_seconds()
    for deployment in deployments:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert 3 * int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) <= timeout, deployment["name"]
