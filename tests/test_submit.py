"""`irefine submit` against a real Prefect server (PostgreSQL): routing, the created flow run, the
rate limit (wait, or exit 3 with --no-wait) and bad input (one line, exit 2, nothing created).

No worker runs here: the flow runs stay Scheduled and are deleted at the end, so that no other
module's worker picks them up.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from engine.core import SpecError
from irefine.cli import BadInput, make_parser
from irefine.submit import parse_deadline
from tests.prefect_project import ROOT, deploy, irefine, project_env

JOB_PREFIX = "submit-test-"  # job ids of this module: its flow runs are deleted at the end
SPEC = """\
problem = "sphere"
problem_params = {dim = 2}
strategy = "random"
batch_size = 4
max_cycles = 2
"""


def _client_call(fn: Any) -> Any:
    from prefect import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def test_help_names_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        make_parser().parse_args(["submit", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: irefine submit" in out and "3 rate limit reached with --no-wait" in out


def test_deadline_durations_and_datetimes() -> None:
    now = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    assert parse_deadline("30m", now) == now + timedelta(minutes=30)
    assert parse_deadline("1h30m", now) == now + timedelta(minutes=90)
    assert parse_deadline("2026-11-27T18:00Z", now) == datetime(2026, 11, 27, 18, tzinfo=UTC)
    assert parse_deadline("2026-11-27T18:00+01:00", now) == datetime(2026, 11, 27, 17, tzinfo=UTC)
    with pytest.raises(BadInput, match="no time zone"):
        parse_deadline("2026-11-27T18:00", now)
    with pytest.raises(BadInput, match="ISO datetime"):
        parse_deadline("tomorrow", now)


@pytest.fixture(scope="module")
def project(prefect_api: str) -> Iterator[str]:
    """The session server set up (`irefine setup`) with `refine` and `refine-aks` deployed; the
    flow runs the module created are deleted afterwards."""
    done = irefine(prefect_api, "setup")
    assert done.returncode == 0, done.stderr
    deploy(prefect_api, "refine", "refine-aks")
    yield prefect_api

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def clean(client: Any) -> None:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["irefine"])), limit=200
        )
        for run in runs:
            if any(tag.startswith(f"job:{JOB_PREFIX}") for tag in run.tags):
                await client.delete_flow_run(run.id)

    _client_call(clean)


@pytest.fixture
def spec_file(tmp_path: Path) -> str:
    path = tmp_path / "job.toml"
    path.write_text(SPEC)
    return str(path)


def _submit(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return irefine(api_url, "submit", *args)


def _flow_run(run_id: str) -> Any:
    return _client_call(lambda client: client.read_flow_run(UUID(run_id)))


def _runs_of_job(job_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    return _client_call(
        lambda client: client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"job:{job_id}"]))
        )
    )


@pytest.fixture
def slow_rate_limit(project: str) -> Iterator[None]:
    """The submission rate limit refilling at 0.2 a second (not 1) for the test, so that a limit
    filled by the test is still full when the submission asks a few hundred ms later."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from deployments.setup import SUBMISSIONS_LIMIT

    def decay(rate: float) -> None:
        _client_call(
            lambda client: client.update_global_concurrency_limit(
                SUBMISSIONS_LIMIT, GlobalConcurrencyLimitUpdate(slot_decay_per_second=rate)
            )
        )

    decay(0.2)
    try:
        yield
    finally:
        decay(1.0)  # irefine setup's value: later setups find it unchanged


def _fill_rate_limit() -> None:
    """Take every free slot of the submission rate limit, as a burst of submissions would."""
    from deployments.setup import SUBMISSIONS_LIMIT

    async def fill(client: Any) -> None:
        limit = await client.read_global_concurrency_limit_by_name(SUBMISSIONS_LIMIT)
        free = limit.limit - int(limit.active_slots)
        if free > 0:
            await client.increment_concurrency_slots(names=[SUBMISSIONS_LIMIT], slots=free, mode="rate_limit")

    _client_call(fill)


@pytest.mark.integration
@pytest.mark.slow
def test_submit_creates_the_run_on_the_requested_queue(project: str, spec_file: str) -> None:
    done = _submit(
        project,
        spec_file,
        "--priority",
        "high",
        "--json",
        "--executor",
        "local",
        "--job-id",
        "submit-test-high",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert (out["job_id"], out["queue"], out["pool"], out["at_risk"]) == (
        "submit-test-high",
        "high",
        "irefine-local",
        False,
    )
    assert out["reason"].startswith("requested priority high")
    run = _flow_run(out["flow_run_id"])
    assert run.work_queue_name == "high"
    assert run.state_name == "Scheduled"
    assert run.parameters["job_id"] == "submit-test-high"
    assert run.parameters["executor"] == "local"
    assert run.parameters["spec"]["problem"] == "sphere" and run.parameters["spec"]["max_cycles"] == 2
    assert {"irefine", "queue:high", "job:submit-test-high"} <= set(run.tags)
    deployment = _client_call(lambda client: client.read_deployment_by_name("refine/refine"))
    assert run.deployment_id == deployment.id

    # The router sees it waiting on `high` now.
    from irefine.submit import read_load

    load = _client_call(lambda client: read_load(client, "irefine-local", now=datetime.now(UTC)))
    assert load.queue("high").waiting >= 1
    assert load.queue("normal").limit == 2 and load.job_limit == 4


@pytest.mark.integration
@pytest.mark.slow
def test_same_job_id_is_one_flow_run(project: str) -> None:
    from engine.core import JobSpec
    from irefine.submit import submit_job

    spec = JobSpec.parse({"problem": "sphere", "max_cycles": 2})

    async def twice(client: Any) -> tuple[Any, Any]:
        first = await submit_job(client, spec, job_id="submit-test-twice", urgency="low")
        return first, await submit_job(client, spec, job_id="submit-test-twice", urgency="low")

    first, second = _client_call(twice)
    assert first.flow_run_id == second.flow_run_id
    assert len(_runs_of_job("submit-test-twice")) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_deadline_that_cannot_be_met_is_flagged(project: str, spec_file: str) -> None:
    done = _submit(
        project, spec_file, "--deadline", "2m", "--estimate", "600", "--job-id", "submit-test-late"
    )
    assert done.returncode == 0, done.stderr
    run = _runs_of_job("submit-test-late")[0]
    assert run.work_queue_name == "critical"
    assert "at-risk" in run.tags
    assert "on irefine-local/critical" in done.stdout
    assert "deadline cannot be met even on critical" in done.stdout
    assert "is at risk" in done.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_kubernetes_pool_gets_the_queue_profile(project: str) -> None:
    from deployments.setup import aks_job_variables
    from engine.core import JobSpec
    from irefine.submit import submit_job

    spec = JobSpec.parse({"problem": "sphere", "max_cycles": 2})
    done = _client_call(
        lambda client: submit_job(
            client, spec, job_id="submit-test-aks", urgency="critical", deployment="refine/refine-aks"
        )
    )
    run = _flow_run(done.flow_run_id)
    assert (done.pool, run.work_queue_name) == ("irefine-aks", "critical")
    assert run.job_variables == aks_job_variables("critical")
    assert run.job_variables["cpu_request"] == "2"


def _cli_submit(*argv: str) -> int:
    """``irefine submit ARGV`` in this process: what main() gets back (or the BadInput it raises).
    In-process so that nothing decays between filling the rate limit and the submission."""
    args = make_parser().parse_args(["submit", *argv])
    return int(args.func(args))


@pytest.mark.integration
@pytest.mark.slow
def test_no_wait_fails_fast_when_the_rate_limit_is_spent(
    project: str, spec_file: str, slow_rate_limit: None, capsys
) -> None:
    _fill_rate_limit()
    code = _cli_submit(spec_file, "--no-wait", "--job-id", "submit-test-refused")
    assert code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("irefine: rate limit reached:")
    assert "retry in ~" in lines[0] and "drop --no-wait" in lines[0]
    assert _runs_of_job("submit-test-refused") == []


@pytest.mark.integration
@pytest.mark.slow
def test_without_no_wait_it_waits_and_says_so(
    project: str, spec_file: str, slow_rate_limit: None, capsys
) -> None:
    _fill_rate_limit()
    code = _cli_submit(spec_file, "--job-id", "submit-test-waited", "--json")
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "waiting for the submission rate limit" in captured.err
    assert out["rate_limit_wait_seconds"] > 0
    assert len(_runs_of_job("submit-test-waited")) == 1


def _count_runs() -> int:
    return int(_client_call(lambda client: client.count_flow_runs()))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "flags", "message"),
    [
        ("problem = 'sphere'\nbatch_size = 0\n", [], "batch_size"),
        ("problem = 'no_such_problem'\n", [], "no_such_problem"),
        ("strategy = 'random'\n", [], "names no problem"),
        ("problem = 'sphere'\n", ["--deadline", "2026-12-01T18:00"], "no time zone"),
        ("problem = 'sphere'\n", ["--deadline", "soon"], "--deadline"),
        ("problem = 'sphere'\n", ["--deadline", "1h"], "--estimate"),
        ("problem = 'sphere'\n", ["--deployment", "refine/nope"], "prefect --no-prompt deploy --all"),
        ("problem = 'sphere'\n", ["--pool", "irefine-aks"], "refine/refine-aks"),
        ("problem = 'sphere'\n", ["--job-id", " padded "], "--job-id"),
    ],
)
def test_bad_input_creates_nothing(
    project: str, tmp_path: Path, body: str, flags: list[str], message: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(body)
    before = _count_runs()
    with pytest.raises((BadInput, SpecError), match=re.escape(message)):  # main() exits 2 for both
        _cli_submit(str(path), *flags)
    assert _count_runs() == before


@pytest.mark.integration
def test_bad_input_on_the_command_line_is_one_line_exit_2(project: str, tmp_path: Path) -> None:
    done = _submit(project, str(tmp_path / "missing.toml"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"irefine: error: spec file {str(tmp_path / 'missing.toml')!r} does not exist"
    ]
    env = project_env("unused")
    env.pop("PREFECT_API_URL")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    spec = tmp_path / "job.toml"
    spec.write_text(SPEC)
    no_server = subprocess.run(
        [sys.executable, "-m", "irefine", "submit", str(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_server.returncode == 2
    lines = no_server.stderr.strip().splitlines()
    assert len(lines) == 1 and "PREFECT_API_URL" in lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_readme_rest_example_makes_the_same_run(project: str) -> None:
    """The README's two curl calls, as HTTP requests: the run lands where `irefine submit` puts it."""
    import httpx

    job_id = f"{JOB_PREFIX}rest"
    found = httpx.post(
        f"{project}/deployments/filter", json={"deployments": {"name": {"any_": ["refine"]}}}, timeout=30
    )
    deployment = found.json()[0]["id"]
    body = {
        "parameters": {"spec": {"problem": "sphere", "max_evaluations": 500}, "job_id": job_id},
        "work_queue_name": "high",
        "idempotency_key": f"irefine-job:{job_id}",
        "tags": ["irefine", "queue:high", f"job:{job_id}"],
    }
    url = f"{project}/deployments/{deployment}/create_flow_run"
    first = httpx.post(url, json=body, timeout=30)
    again = httpx.post(url, json=body, timeout=30)
    assert first.status_code == 201, first.text
    assert again.json()["id"] == first.json()["id"]  # the idempotency key, as with a resubmission
    run = _flow_run(first.json()["id"])
    assert (run.work_queue_name, run.parameters["job_id"]) == ("high", job_id)
    assert run.parameters["spec"] == {"problem": "sphere", "max_evaluations": 500}
