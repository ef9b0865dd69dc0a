"""Anomalies as Prefect events on a real Prefect server, in the store, and in `irefine status`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest

from engine.core import JobSpec
from engine.observe import ANOMALY_KINDS
from engine.settings import load_settings
from engine.store import JobStore
from tests.prefect_server import drain_prefect
from tests.test_anomaly import CASES, normal_series

pytestmark = [pytest.mark.integration]


def read_events(api_url: str, job_id: str, want: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The job's anomaly events, through the server's REST API (``POST /events/filter``); waits
    until ``want`` have arrived (events reach the server asynchronously)."""
    body = {
        "filter": {
            "event": {"prefix": ["refinement.anomaly."]},
            "resource": {"id": [f"irefine.job.{job_id}"]},
        },
        "limit": 50,
    }
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drain_prefect()
        response = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        events = list(response.json()["events"])
        if len(events) >= want:
            break
        time.sleep(0.5)
    return events


@pytest.mark.parametrize(("kind", "changes"), [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_each_anomaly_kind_becomes_a_prefect_event_a_log_line_and_a_stored_row(
    kind: str, changes: dict, prefect_api: str, ire_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from engine.runner import create_job
    from flows.anomalies import anomaly_observer, report_findings
    from flows.observers import ObserverContext, Observers

    job_id = f"anomaly-{kind}-{uuid.uuid4().hex[:6]}"
    settings = load_settings()
    store = JobStore.from_settings(settings)
    try:
        job = create_job(store, JobSpec.parse({"problem": "sphere", "max_evaluations": 10_000}), job_id)
        logger = logging.getLogger("test.anomaly")
        context = ObserverContext(store, settings, logger, None)
        observer = Observers(job, context, [anomaly_observer], report_findings)
        with caplog.at_level(logging.WARNING, logger="test.anomaly"):
            for record in normal_series(**changes):
                observer(job, record)
        stored = store.anomalies(job_id, fresh=True)
    finally:
        store.close()
    assert [a.kind for a in stored] == [kind]
    assert [r.getMessage() for r in caplog.records] == [
        f"job {job_id}: anomaly {kind} at cycle {stored[0].cycle}: {stored[0].message}"
    ]
    (event,) = read_events(prefect_api, job_id, 1)
    assert event["event"] == f"refinement.anomaly.{kind}"
    assert event["resource"] == {
        "prefect.resource.id": f"irefine.job.{job_id}",
        "prefect.resource.name": job_id,
        "irefine.job-id": job_id,
    }
    assert event["payload"]["cycle"] == stored[0].cycle
    assert event["payload"]["message"] == stored[0].message
    assert event["payload"]["evidence"] == json.loads(json.dumps(stored[0].evidence))
    assert event["related"] == []  # no flow run here


def test_kinds_under_test_cover_every_kind() -> None:
    assert sorted(c[0] for c in CASES) == sorted(ANOMALY_KINDS)


@pytest.mark.slow
def test_refine_flow_reports_a_failure_burst(prefect_api: str, ire_env: dict[str, str]) -> None:
    """End to end: a job whose evaluations fail half the time (more than it ever did before, as it
    has no history: the prior is 5%) emits the event, related to its flow run, stores the anomaly
    once, and `irefine status` shows it."""
    from flows.refine import run_refine

    job_id = f"burst-{uuid.uuid4().hex[:6]}"
    spec = JobSpec.parse(
        {
            "problem": "tests.problems_for_tests:Flaky",
            "problem_params": {"fail_every": 2},
            "strategy": "random",
            "batch_size": 16,
            "max_cycles": 3,
            "max_evaluations": None,
            "max_failure_share": 1.0,
            "cache": "off",
        }
    )
    result = run_refine(spec=spec, job_id=job_id, executor="local")
    assert result.status == "completed" and result.failed_evaluations > 0
    store = JobStore.from_settings(load_settings())
    try:
        stored = store.anomalies(job_id, fresh=True)
        flow_run_id = store.get_job(job_id, fresh=True).flow_run_id
    finally:
        store.close()
    assert [(a.kind, a.cycle) for a in stored] == [("failure_burst", 1)]  # once, not every cycle
    (event,) = read_events(prefect_api, job_id, 1)
    assert event["event"] == "refinement.anomaly.failure_burst"
    assert event["payload"]["cycle"] == 1
    # Ours, plus what Prefect adds from the run context (the flow, ...).
    roles = {r["prefect.resource.id"]: r["prefect.resource.role"] for r in event["related"]}
    assert roles[f"prefect.flow-run.{flow_run_id}"] == "flow-run"
    assert "flow" in roles.values()

    def status(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "irefine", "status", job_id, *flags],
            env=ire_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    as_json = json.loads(status("--json").stdout)
    assert [(a["kind"], a["cycle"]) for a in as_json["anomalies"]] == [("failure_burst", 1)]
    assert as_json["anomalies"][0]["evidence"]["failed"] > 0
    text = status().stdout
    assert f"cycle 1 failure_burst: {stored[0].message}" in text
