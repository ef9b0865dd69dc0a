"""Create the Prefect objects the engine relies on: work pools, prioritised queues and limits.

Idempotent: each object is read first and created, updated or left alone; the returned
:class:`SetupReport` says which. Limits must exist before they are used: a missing global limit is
silently not enforced unless ``strict=True`` (docs/architecture.md section 7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.exceptions import ObjectNotFound

from deployments.automations import AutomationPolicy, check_webhook_url, ensure_automations
from deployments.report import Outcome as Outcome
from deployments.report import SetupItem as SetupItem
from deployments.report import SetupReport
from flows.limits import EVALUATIONS_LIMIT as EVALUATIONS_LIMIT
from flows.limits import RUNNING_JOBS_LIMIT as RUNNING_JOBS_LIMIT

# Queue name -> (priority, concurrency limit). 1 is served first; None means no queue limit.
QUEUES: dict[str, tuple[int, int | None]] = {
    "critical": (1, None),
    "high": (2, 4),
    "normal": (3, 2),
    "low": (4, 1),
}
SUBMISSIONS_LIMIT = "irefine-submissions"
WORKER_POLL_LIMIT = "irefine-worker-poll"  # one worker polls at a time: deployments/worker.py
AKS_TEMPLATE_PATH = Path(__file__).parent / "aks" / "base-job-template.json"


def aks_base_job_template() -> dict[str, Any]:
    """The Kubernetes pool's base job template (deployments/aks/base-job-template.json)."""
    return json.loads(AKS_TEMPLATE_PATH.read_text())  # type: ignore[no-any-return]


def process_base_job_template() -> dict[str, Any]:
    """The default template of a process work pool."""
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


async def ensure_work_pool(
    client: PrefectClient,
    report: SetupReport,
    name: str,
    pool_type: str,
    template: dict[str, Any],
    concurrency_limit: int | None = None,
) -> None:
    """Create the pool with ``template`` and ``concurrency_limit``, or bring it back to them. The
    type cannot change.

    The pool's limit is what makes the server hand a pool's runs out in queue-priority order
    within the job budget; flows/refine.py's running-jobs slot is the hard cap across pools.
    """
    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name, type=pool_type, base_job_template=template, concurrency_limit=concurrency_limit
            )
        )
        report.add("work-pool", name, "created", f"type {pool_type}")
        return
    if pool.type != pool_type:
        raise ValueError(
            f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}: "
            f"delete it (`prefect work-pool delete {name}`) or choose another name"
        )
    changes: dict[str, Any] = {}
    if pool.base_job_template != template:
        changes["base_job_template"] = template
    if pool.concurrency_limit != concurrency_limit:
        changes["concurrency_limit"] = concurrency_limit
    if changes:
        await client.update_work_pool(name, WorkPoolUpdate(**changes))
        report.add("work-pool", name, "updated", ", ".join(c.replace("_", " ") for c in changes))
    else:
        report.add("work-pool", name, "unchanged", f"type {pool_type}")


async def ensure_queues(
    client: PrefectClient, report: SetupReport, pool: str, queues: Mapping[str, tuple[int, int | None]]
) -> None:
    """Create or update each queue's priority and concurrency limit (in priority order)."""
    for name, (priority, limit) in sorted(queues.items(), key=lambda q: q[1][0]):
        detail = f"priority {priority}, limit {'none' if limit is None else limit}"
        try:
            queue = await client.read_work_queue_by_name(name, work_pool_name=pool)
        except ObjectNotFound:
            await client.create_work_queue(
                name, priority=priority, concurrency_limit=limit, work_pool_name=pool
            )
            report.add("work-queue", f"{pool}/{name}", "created", detail)
            continue
        changes: dict[str, Any] = {}
        if queue.priority != priority:
            changes["priority"] = priority
        if queue.concurrency_limit != limit:
            changes["concurrency_limit"] = limit
        if changes:
            await client.update_work_queue(queue.id, **changes)
            report.add("work-queue", f"{pool}/{name}", "updated", detail)
        else:
            report.add("work-queue", f"{pool}/{name}", "unchanged", detail)


async def ensure_global_limit(
    client: PrefectClient, report: SetupReport, name: str, limit: int, slot_decay_per_second: float = 0.0
) -> None:
    """Create or update an active global concurrency limit (a rate limit when the decay is positive)."""
    detail = f"limit {limit}" + (f", decay {slot_decay_per_second}/s" if slot_decay_per_second else "")
    try:
        existing = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name=name, limit=limit, slot_decay_per_second=slot_decay_per_second, active=True
            )
        )
        report.add("concurrency-limit", name, "created", detail)
        return
    if (
        existing.limit != limit
        or (existing.slot_decay_per_second or 0.0) != slot_decay_per_second
        or not existing.active
    ):
        await client.update_global_concurrency_limit(
            name,
            GlobalConcurrencyLimitUpdate(
                limit=limit, slot_decay_per_second=slot_decay_per_second, active=True
            ),
        )
        report.add("concurrency-limit", name, "updated", detail)
    else:
        report.add("concurrency-limit", name, "unchanged", detail)


async def setup_prefect(
    client: PrefectClient,
    *,
    local_pool: str = "irefine-local",
    aks_pool: str | None = "irefine-aks",
    queues: Mapping[str, tuple[int, int | None]] = QUEUES,
    job_limit: int = 4,
    evaluation_limit: int = 64,
    submission_rate: float = 1.0,
    submission_burst: int = 10,
    notify_webhook_url: str | None = None,
    automation_policy: AutomationPolicy | None = None,
) -> SetupReport:
    """Create or update the engine's Prefect objects; running it again changes nothing.

    - ``local_pool`` (process) and ``aks_pool`` (kubernetes, skipped when None), each with the
      queues critical/high/normal/low (priorities 1-4 and per-queue limits from ``queues``) and a
      pool concurrency limit of ``job_limit``;
    - ``irefine-running-jobs``: global limit of ``job_limit`` concurrently running jobs;
    - ``irefine-evaluations``: global limit of ``evaluation_limit`` evaluation slots in flight;
    - ``irefine-submissions``: rate limit, ``submission_burst`` slots refilled at
      ``submission_rate`` a second;
    - ``irefine-worker-poll``: limit 1, the turn in which an ``irefine worker`` polls its pool;
    - the automations of deployments/automations.py (resume crashed jobs, pause a queue on a
      failure burst, deadline and anomaly alerts) and, given ``notify_webhook_url``, the webhook
      notification block they notify through.
    """
    for label, value in (
        ("job_limit", job_limit),
        ("evaluation_limit", evaluation_limit),
        ("submission_burst", submission_burst),
    ):
        if value < 1:
            raise ValueError(f"{label} must be at least 1, not {value}")
    if submission_rate <= 0:
        raise ValueError(f"submission_rate must be positive, not {submission_rate}")
    if notify_webhook_url is not None:
        check_webhook_url(notify_webhook_url)
    report = SetupReport()
    pools = [(local_pool, "process", process_base_job_template())]
    if aks_pool:
        pools.append((aks_pool, "kubernetes", aks_base_job_template()))
    for name, pool_type, template in pools:
        await ensure_work_pool(client, report, name, pool_type, template, job_limit)
        await ensure_queues(client, report, name, queues)
    await ensure_global_limit(client, report, RUNNING_JOBS_LIMIT, job_limit)
    await ensure_global_limit(client, report, EVALUATIONS_LIMIT, evaluation_limit)
    await ensure_global_limit(client, report, SUBMISSIONS_LIMIT, submission_burst, submission_rate)
    await ensure_global_limit(client, report, WORKER_POLL_LIMIT, 1)
    await ensure_automations(client, report, notify_webhook_url, automation_policy)
    return report


async def run_setup(**options: Any) -> SetupReport:
    """:func:`setup_prefect` with a client of the configured API (PREFECT_API_URL)."""
    from prefect import get_client

    async with get_client() as client:
        return await setup_prefect(client, **options)


def aks_job_variables(queue: str, prefect_yaml: Path | None = None) -> dict[str, Any]:
    """The Kubernetes job variables (CPU, memory, node pool) of ``queue``'s profile in prefect.yaml."""
    import yaml

    path = prefect_yaml or Path(__file__).parent.parent / "prefect.yaml"
    profiles = yaml.safe_load(path.read_text())["definitions"]["queue_profiles"]
    if queue not in profiles:
        raise ValueError(f"no job profile for queue {queue!r}: one of {', '.join(profiles)}")
    return dict(profiles[queue])
