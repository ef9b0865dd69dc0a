"""``irefine submit``: route a job to a work-pool queue and create a flow run of the deployment.

Order of work, so that a refusal leaves nothing behind: validate the spec exactly as ``irefine run``
does (problem and strategy load), find the deployment and its pool, read the pool's load, route
(``engine.routing.route``), take a slot of the submission rate limit, then create the flow run on
the chosen queue. The job id is chosen here and passed as a parameter, so a rerun of the flow run
(``prefect flow-run retry`` or the resume automation) resumes the job instead of starting anew,
and the same job id submitted twice gives the same flow run (it is the idempotency key).

Exit codes: 0 submitted, 1 the Prefect API failed, 2 bad input or missing set-up (nothing created),
3 the submission rate limit is spent and ``--no-wait`` was given (nothing created).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from irefine.errors import EXIT_FAILED, EXIT_OK, BadInput
from irefine.spec_args import load_spec_file

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from engine.core import JobSpec
    from engine.routing import Load, QueueName, Route

EXIT_RATE_LIMITED = 3
DEFAULT_DEPLOYMENT = "refine/refine"
DEFAULT_RUN_SECONDS = 300.0
"""Run time assumed for the wait estimate when neither ``--estimate`` nor ``max_seconds`` is given
and there is no deadline (the queue choice then does not depend on it)."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RateLimited(Exception):
    """The submission rate limit has no free slot and the caller would not wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the submission rate limit has no free slot for ~{math.ceil(retry_after)}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Submission:
    """A created flow run and why it went where it did."""

    job_id: str
    flow_run_id: str
    flow_run_name: str
    deployment: str
    pool: str
    queue: str
    route: Route
    rate_limit_wait_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract."""
        finish = self.route.estimated_finish
        return {
            "job_id": self.job_id,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "deployment": self.deployment,
            "pool": self.pool,
            "queue": self.queue,
            "priority": self.route.priority,
            "reason": self.route.reason,
            "at_risk": self.route.at_risk,
            "estimated_start_seconds": _finite_or_none(self.route.estimated_start_seconds),
            "estimated_finish": finish.isoformat() if finish else None,
            "slack_seconds": self.route.slack_seconds,
            "rate_limit_wait_seconds": round(self.rate_limit_wait_seconds, 3),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def parse_deadline(text: str, now: datetime) -> datetime:
    """``--deadline``: an ISO datetime with a time zone, or a duration from ``now`` (``30m``, ``1h30m``)."""
    compact = text.strip().lower()
    if compact and re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", compact):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(compact))
        return now + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"--deadline {text!r}: give an ISO datetime with a time zone "
            "(2026-12-01T18:00Z) or a duration (30m, 2h, 1d)"
        ) from None
    if when.utcoffset() is None:
        raise BadInput(f"--deadline {text!r} has no time zone: add one, e.g. {text.strip()}Z for UTC")
    return when


def spec_from_file(path: str, job_id: str) -> JobSpec:
    """The job spec of ``path``, validated as ``irefine run`` validates it (problem and strategy load)."""
    from engine.core import JobSpec
    from engine.runner import build_job
    from engine.settings import load_settings

    data = load_spec_file(path)
    if "problem" not in data:
        raise BadInput(f"spec file {path!r} names no problem: add problem = 'NAME' (see `irefine problems`)")
    spec = JobSpec.parse(data)
    # As the deployment run will: only built-ins, plug-ins and IRE_PROBLEM_MODULES.
    build_job(job_id, spec, allowed_modules=load_settings().problem_module_prefixes())
    return spec


async def read_load(client: PrefectClient, pool: str, *, now: datetime) -> Load:
    """The pool's load for the router, from the Prefect API.

    Per queue: *waiting* = runs in a Scheduled-type state (Scheduled, Late, AwaitingRetry) due by
    now (a nightly run due tomorrow is not waiting); *running* = Pending and Running runs, which
    is what Prefect counts against queue and pool limits. The job limit is the tighter of the
    global ``irefine-running-jobs`` limit and the pool's own limit; running jobs the larger of the
    slots held and the runs the pool counts.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
        WorkQueueFilter,
        WorkQueueFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    from deployments.setup import RUNNING_JOBS_LIMIT
    from engine.routing import QUEUES, Load, QueueLoad

    work_pool = await client.read_work_pool(pool)
    queues = {q.name: q for q in await client.read_work_queues(work_pool_name=pool)}
    missing = [q for q in QUEUES if q not in queues]
    if missing:
        raise BadInput(f"work pool {pool!r} has no queue {', '.join(missing)}: run `irefine setup`")
    pool_filter = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))

    def runs(queue: str, states: list[StateType], due: bool) -> Any:
        flow_runs = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)))
        if due:
            flow_runs.next_scheduled_start_time = FlowRunFilterNextScheduledStartTime(before_=now)  # type: ignore[arg-type]  # pydantic takes datetime
        return client.count_flow_runs(
            flow_run_filter=flow_runs,
            work_pool_filter=pool_filter,
            work_queue_filter=WorkQueueFilter(name=WorkQueueFilterName(any_=[queue])),
        )

    counts = await asyncio.gather(
        *(runs(q, [StateType.SCHEDULED], True) for q in QUEUES),
        *(runs(q, [StateType.PENDING, StateType.RUNNING], False) for q in QUEUES),
    )
    waiting = dict(zip(QUEUES, counts[: len(QUEUES)], strict=True))
    running = dict(zip(QUEUES, counts[len(QUEUES) :], strict=True))
    job_limit, held = work_pool.concurrency_limit, 0
    try:
        limit = await client.read_global_concurrency_limit_by_name(RUNNING_JOBS_LIMIT)
    except ObjectNotFound:
        raise BadInput(f"no global limit {RUNNING_JOBS_LIMIT!r} on the server: run `irefine setup`") from None
    if limit.active:
        job_limit = limit.limit if job_limit is None else min(job_limit, limit.limit)
        held = limit.active_slots
    return Load(
        queues={
            q: QueueLoad(q, waiting=waiting[q], running=running[q], limit=queues[q].concurrency_limit)
            for q in QUEUES
        },
        running_jobs=max(held, sum(running.values())),
        job_limit=job_limit,
    )


async def take_submission_slot(
    client: PrefectClient, *, wait: bool, on_wait: Callable[[float], None] = lambda s: None
) -> float:
    """Take one slot of the ``irefine-submissions`` rate limit; return the seconds spent waiting.

    One non-blocking attempt first, to learn whether and how long to wait (the server's
    Retry-After). Without a free slot: :class:`RateLimited` when ``wait`` is false, otherwise
    ``on_wait(seconds)`` and Prefect's ``rate_limit`` until a slot decays free.
    """
    from httpx import HTTPStatusError
    from prefect.concurrency.asyncio import rate_limit

    from deployments.setup import SUBMISSIONS_LIMIT

    try:
        response = await client.increment_concurrency_slots(
            names=[SUBMISSIONS_LIMIT], slots=1, mode="rate_limit"
        )
    except HTTPStatusError as exc:
        if exc.response.status_code != 423:
            raise
        retry_after = float(exc.response.headers.get("Retry-After", 1.0))
    else:
        if not response.json():
            raise BadInput(f"the rate limit {SUBMISSIONS_LIMIT!r} does not exist: run `irefine setup`")
        return 0.0
    if not wait:
        raise RateLimited(retry_after)
    on_wait(retry_after)
    started = time.monotonic()
    await rate_limit(SUBMISSIONS_LIMIT, strict=True)
    return time.monotonic() - started


async def submit_job(
    client: PrefectClient,
    spec: JobSpec,
    *,
    job_id: str,
    urgency: QueueName | None = None,
    deadline: datetime | None = None,
    estimated_seconds: float | None = None,
    deployment: str = DEFAULT_DEPLOYMENT,
    pool: str | None = None,
    wait: bool = True,
    flow_parameters: Mapping[str, Any] | None = None,
    on_wait: Callable[[float], None] = lambda s: None,
) -> Submission:
    """Route ``spec`` and create a flow run of ``deployment`` on the chosen queue (see the module doc).

    ``pool`` must be the deployment's pool when given (a flow run cannot change pools: pick the
    deployment). ``flow_parameters`` are further ``refine`` parameters (``executor``,
    ``dask_address``). Raises :class:`BadInput` or :class:`~engine.core.SpecError` (nothing created) and
    :class:`RateLimited`.
    """
    from prefect.exceptions import ObjectNotFound

    from deployments.setup import aks_job_variables
    from engine.routing import Request, route

    try:
        found = await client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise BadInput(
            f"no deployment {deployment!r} on the Prefect server: run `irefine setup` then "
            "`prefect --no-prompt deploy --all` in the project directory"
        ) from None
    if not found.work_pool_name:
        raise BadInput(f"deployment {deployment!r} has no work pool: redeploy it with `prefect deploy --all`")
    if pool is not None and pool != found.work_pool_name:
        raise BadInput(
            f"--pool {pool!r}: deployment {deployment!r} runs on pool {found.work_pool_name!r}; "
            "choose the deployment of that pool (e.g. --deployment refine/refine-aks)"
        )
    pool = found.work_pool_name
    try:
        work_pool = await client.read_work_pool(pool)
    except ObjectNotFound:
        raise BadInput(f"work pool {pool!r} does not exist: run `irefine setup`") from None
    now = datetime.now(UTC)
    seconds = estimated_seconds if estimated_seconds is not None else spec.max_seconds
    if seconds is None:
        if deadline is not None or spec.deadline is not None:
            raise BadInput("a deadline needs a run time: pass --estimate SECONDS or set max_seconds")
        seconds = DEFAULT_RUN_SECONDS
    load = await read_load(client, pool, now=now)
    request = Request.from_spec(
        spec, submitted_at=now, urgency=urgency, deadline=deadline, estimated_seconds=seconds
    )
    chosen = route(request, load)
    waited = await take_submission_slot(client, wait=wait, on_wait=on_wait)
    if waited > 0:  # the load and the time left have changed while waiting: route again
        request = replace(request, submitted_at=datetime.now(UTC))
        chosen = route(request, await read_load(client, pool, now=request.submitted_at))
    tags = ["irefine", f"queue:{chosen.queue}", f"job:{job_id}"]
    if chosen.at_risk:
        tags.append("at-risk")
    if request.deadline is not None:
        tags.append(f"deadline:{request.deadline.astimezone(UTC).isoformat()}")
    run = await client.create_flow_run_from_deployment(
        found.id,
        parameters={**(flow_parameters or {}), "spec": spec.model_dump(mode="json"), "job_id": job_id},
        work_queue_name=chosen.queue,
        job_variables=aks_job_variables(chosen.queue) if work_pool.type == "kubernetes" else None,
        tags=tags,
        idempotency_key=f"irefine-job:{job_id}",
    )
    return Submission(
        job_id=job_id,
        flow_run_id=str(run.id),
        flow_run_name=run.name,
        deployment=deployment,
        pool=pool,
        queue=chosen.queue,
        route=chosen,
        rate_limit_wait_seconds=waited,
    )


def add_parser(sub: Any) -> None:
    """Add ``submit`` to the CLI's subcommands."""
    p = sub.add_parser(
        "submit",
        help="route a job to a queue and create a flow run of the deployment (needs a Prefect server)",
        description="Validate the spec, pick the queue (critical/high/normal/low) from --priority, "
        "--deadline and the current load, take a slot of the submission rate limit and create a "
        "flow run of the deployment on that queue. A worker runs it. Exit codes: 0 submitted, "
        "1 Prefect API error, 2 bad input or missing set-up, 3 rate limit reached with --no-wait.",
    )
    p.add_argument("spec", help="TOML job spec (as for `irefine run`)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--priority", choices=["critical", "high", "normal", "low"], help="run on this queue")
    when.add_argument(
        "--deadline",
        metavar="T",
        help="finish by T: an ISO datetime with a time zone or a duration from now (30m, 2h)",
    )
    p.add_argument(
        "--estimate",
        type=float,
        metavar="SECONDS",
        help="expected run time for the deadline check (default: the spec's max_seconds)",
    )
    p.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help=f"default {DEFAULT_DEPLOYMENT}")
    p.add_argument("--pool", help="expected work pool (default: the deployment's)")
    p.add_argument("--job-id", help="id of the job (default: a fresh one); the same id resubmits nothing")
    p.add_argument("--executor", choices=["dask", "local"], help="the flow's executor (default dask)")
    p.add_argument("--dask-address", help="Dask scheduler for the flow (default: the worker's setting)")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help=f"fail with exit code {EXIT_RATE_LIMITED} instead of waiting when the rate limit is spent",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_submit)


def _print_submission(done: Submission, as_json: bool) -> None:
    if as_json:
        print(json.dumps(done.to_dict()))
    else:
        print(
            f"job {done.job_id}: flow run {done.flow_run_name} ({done.flow_run_id}) "
            f"on {done.pool}/{done.queue}\n  route: {done.route.reason}"
        )
    if done.route.at_risk:
        print(f"irefine: warning: job {done.job_id} is at risk: {done.route.reason}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    """``irefine submit``: see the module docstring."""
    from prefect.settings import get_current_settings

    from engine.core import SpecError
    from engine.runner import new_job_id

    if args.estimate is not None and (not math.isfinite(args.estimate) or args.estimate < 0):
        raise BadInput(f"--estimate {args.estimate}: give a run time in seconds >= 0")
    job_id = args.job_id if args.job_id is not None else new_job_id()
    if not job_id or len(job_id) > 200 or job_id != job_id.strip():
        raise BadInput(f"--job-id {job_id!r}: use 1 to 200 characters, no surrounding spaces")
    spec = spec_from_file(args.spec, job_id)
    deadline = parse_deadline(args.deadline, datetime.now(UTC)) if args.deadline else None
    if not get_current_settings().api.url:
        raise BadInput(
            "submit needs a Prefect server with workers: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    flow_parameters = {
        k: v for k, v in (("executor", args.executor), ("dask_address", args.dask_address)) if v
    }

    def say_waiting(seconds: float) -> None:
        print(f"irefine: waiting for the submission rate limit (~{math.ceil(seconds)}s)", file=sys.stderr)

    async def go() -> Submission:
        from prefect import get_client

        async with get_client() as client:
            return await submit_job(
                client,
                spec,
                job_id=job_id,
                urgency=args.priority,
                deadline=deadline,
                estimated_seconds=args.estimate,
                deployment=args.deployment,
                pool=args.pool,
                wait=not args.no_wait,
                flow_parameters=flow_parameters,
                on_wait=say_waiting,
            )

    try:
        done = asyncio.run(go())
    except RateLimited as exc:
        print(
            "irefine: rate limit reached: irefine-submissions has no free slot; "
            f"retry in ~{math.ceil(exc.retry_after)}s or drop --no-wait",
            file=sys.stderr,
        )
        return EXIT_RATE_LIMITED
    except (BadInput, SpecError):  # main() says what to change, exit code 2
        raise
    except Exception as exc:
        print(f"irefine: submit failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_submission(done, args.json)
    return EXIT_OK
