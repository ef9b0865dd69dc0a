"""The automations `irefine setup` creates: what the Prefect server does by itself when a job's
flow run crashes, when runs keep failing on a queue, when a job misses its deadline, and when the
monitoring reports an anomaly.

- ``irefine-resume-crashed-job``: a deployment run of the ``refine`` flow that crashed and is still
  Crashed ``crash_settle`` later is set back to Scheduled (``AwaitingRetry``): the same flow run,
  on its own queue. The worker runs it again with the same parameters,
  and the flow resumes that run's job from its last checkpoint (its job id is ``run-<flow run id>``
  or the one given). Prefect's flow ``retries`` do not cover crashes, hence this. The cap: a run is
  rescheduled only while its run count is at most ``max_crash_resumes`` (the run count goes up each
  time the run starts), so a job that crashes every time runs ``max_crash_resumes + 1`` times and
  then stays Crashed. Why wait: a process worker reports a killed flow process as Crashed twice,
  the second time seconds later, after it has run the flow's crash hooks (the flow executor, then
  the worker itself). Rescheduled at once, the run was hit by that late second report while the
  worker was already starting it again, and ran twice. While the run is still Crashed the server
  rejects the late report, so the trigger waits for ``crash_settle`` with no other state change
  of the run (a Proactive trigger after ``Crashed``); a run someone retried meanwhile is left alone.
- ``irefine-crash-silent-runs``: a deployment run of ``refine`` that is Running but has sent no
  Prefect heartbeat for ``heartbeat_timeout`` (90 s: three of the 30 s heartbeats prefect.yaml
  turns on) is marked Crashed: its process hangs, or its machine or pod is gone without anyone
  reporting it. ``irefine-resume-crashed-job`` then resumes it like any crashed run. A hung
  process that wakes up later cannot write over the resumed job: the store refuses a cycle that is
  already committed.
- ``irefine-reschedule-stuck-pending``: a deployment run of ``refine`` still Pending
  ``pending_timeout`` after a worker claimed it (the worker died between claiming the run and
  starting its process: Prefect leaves it Pending for ever, upstream #18933) is set back to
  Scheduled (``AwaitingRetry``, forced: the server refuses Pending -> Scheduled otherwise), and a
  live worker takes it. A worker that was only slow and starts it after all cannot run the job
  twice: the store refuses a cycle that is already committed.
- ``irefine-pause-queue-on-failures``: ``failure_burst`` failed or crashed ``refine`` runs on one
  work queue within ``failure_window`` pause that queue (inferred from the last run's work queue;
  one count per queue) and notify. Resume it with ``prefect work-queue resume QUEUE --pool POOL``.
- ``irefine-deadline-missed``: the ``refinement.deadline.missed`` event (flows/deadline.py) notifies.
- ``irefine-anomaly``: ``refinement.anomaly.*`` events of a job notify.

Notifications go through the custom-webhook notification block ``irefine-notify``, made from the
webhook URL given to setup (kept in the block's secrets, so the UI does not show it). Without a URL
and without that block, the alert automations are still created, with no notification (their
firings still show in the UI's event feed), and the report says so; a later setup with a URL adds
the notification. A URL given once is kept: a later setup without one reuses the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from prefect.automations import (
    AutomationCore,
    ChangeFlowRunState,
    DoNothing,
    EventTrigger,
    PauseWorkQueue,
    Posture,
    SendNotification,
)
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from deployments.report import SetupReport

FLOW_NAME = "refine"
NOTIFY_BLOCK = "irefine-notify"
RESUME_CRASHED = "irefine-resume-crashed-job"
CRASH_SILENT = "irefine-crash-silent-runs"
STUCK_PENDING = "irefine-reschedule-stuck-pending"
PAUSE_ON_FAILURES = "irefine-pause-queue-on-failures"
DEADLINE_ALERT = "irefine-deadline-missed"
ANOMALY_ALERT = "irefine-anomaly"
DEADLINE_EVENT = "refinement.deadline.missed"
ANOMALY_EVENTS = "refinement.anomaly.*"
JOB_RESOURCES = "irefine.job.*"
NO_NOTIFY = "no notification: give irefine setup --notify-webhook URL"

# The webhook's JSON body; the block fills in the automation's rendered subject and body.
WEBHOOK_JSON = {"source": "irefine", "subject": "{{subject}}", "body": "{{body}}"}

# Jinja templates rendered by the server with the triggering event (and the objects it names).
_JOB = '{{ event.resource.id | replace("irefine.job.", "") }}'
_QUEUE = "{{ flow_run.work_queue_name or 'none' }}"
ANOMALY_SUBJECT = f'irefine: {{{{ event.event | replace("refinement.anomaly.", "") }}}} anomaly in job {_JOB}'
ANOMALY_BODY = (
    f"Job {_JOB} (queue {_QUEUE}), cycle {{{{ event.payload.cycle }}}}: {{{{ event.payload.message }}}}\n"
    "Evidence: {{ event.payload.evidence | tojson }}"
)
DEADLINE_SUBJECT = f"irefine: job {_JOB} missed its deadline"
DEADLINE_BODY = f"Job {_JOB} (queue {_QUEUE}): {{{{ event.payload.message }}}}"
_BURST_QUEUE = '{{ event.resource_in_role["work-queue"].name }}'
_BURST_POOL = '{{ event.resource_in_role["work-pool"].name }}'
BURST_SUBJECT = f"irefine: queue {_BURST_QUEUE} paused after repeated job failures"
BURST_BODY = (
    f"{{{{ firing.trigger.threshold }}}} refine runs failed or crashed on queue {_BURST_QUEUE} of pool "
    f"{_BURST_POOL} within {{{{ firing.trigger.within }}}}; the queue is paused. Last: flow run "
    '{{ event.resource.name }} ({{ event.resource["prefect.state-name"] }}: '
    '{{ event.resource["prefect.state-message"] }}).\n'
    f"Resume it with: prefect work-queue resume {_BURST_QUEUE} --pool {_BURST_POOL}"
)
RESUME_SUBJECT = "irefine: crashed flow run {{ event.resource.name }} rescheduled to resume its job"
RESUME_BODY = (
    'Flow run {{ event.resource.name }} crashed on run {{ event.resource["prefect.run-count"] }} '
    '({{ event.resource["prefect.state-message"] }}); it is rescheduled and resumes its job from the '
    "last checkpoint."
)


@dataclass(frozen=True)
class AutomationPolicy:
    """How many times a crashed run is resumed, and what failure burst pauses a queue."""

    max_crash_resumes: int = 3
    failure_burst: int = 3
    failure_window: timedelta = timedelta(minutes=10)
    crash_settle: timedelta = timedelta(seconds=20)
    heartbeat_timeout: timedelta = timedelta(seconds=90)
    pending_timeout: timedelta = timedelta(seconds=90)

    def __post_init__(self) -> None:
        if self.max_crash_resumes < 1:
            raise ValueError(f"max_crash_resumes must be at least 1, not {self.max_crash_resumes}")
        if self.failure_burst < 1:
            raise ValueError(f"failure_burst must be at least 1, not {self.failure_burst}")
        if self.failure_window <= timedelta(0):
            raise ValueError(f"failure_window must be positive, not {self.failure_window}")
        if self.heartbeat_timeout < timedelta(seconds=10):
            raise ValueError(
                f"heartbeat_timeout must be at least 10 s (a Proactive trigger), not {self.heartbeat_timeout}"
            )
        if self.pending_timeout < timedelta(seconds=10):
            raise ValueError(
                f"pending_timeout must be at least 10 s (a Proactive trigger), not {self.pending_timeout}"
            )
        if self.crash_settle < timedelta(seconds=10):
            raise ValueError(
                f"crash_settle must be at least 10 s (a Proactive trigger), not {self.crash_settle}"
            )


# The states a crashed run may move to when someone (or something) else retries or ends it.
_MOVED_ON = (
    "Scheduled",
    "AwaitingRetry",
    "Late",
    "Pending",
    "Running",
    "Retrying",
    "Completed",
    "Failed",
    "Cancelling",
    "Cancelled",
    "Paused",
    "Suspended",
)


def _refine_flow() -> dict[str, str | list[str]]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}


def _refine_run_stuck(
    after: set[str], expect: set[str], within: timedelta, match: dict[str, Any] | None = None
) -> EventTrigger:
    """Fires once for a deployment run of the refine flow that emitted one of ``after`` and then none
    of ``expect`` for ``within`` (``match``: more labels the flow-run event must have)."""
    return EventTrigger(
        after=after,
        expect=expect,
        match={"prefect.resource.id": "prefect.flow-run.*", **(match or {})},
        match_related=[_refine_flow(), {"prefect.resource.role": "deployment"}],
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=within,
    )


def automation_specs(notify_block_id: UUID | None, policy: AutomationPolicy) -> list[AutomationCore]:
    """The automations setup keeps on the server; ``notify_block_id`` None means no notification."""

    def notify(subject: str, body: str) -> list[SendNotification]:
        if notify_block_id is None:
            return []
        return [SendNotification(block_document_id=notify_block_id, subject=subject, body=body)]

    def alert(subject: str, body: str) -> list[Any]:
        return notify(subject, body) or [DoNothing()]

    def job_event_alert(name: str, description: str, event: str, subject: str, body: str) -> AutomationCore:
        """An alert on each ``event`` (a name or a pattern) about a job."""
        return AutomationCore(
            name=name,
            description=description,
            trigger=EventTrigger(
                expect={event},
                match={"prefect.resource.id": JOB_RESOURCES},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=alert(subject, body),
        )

    # Run counts 1..cap: a run that crashed after starting at most `cap` times is rescheduled.
    run_counts = [str(n) for n in range(1, policy.max_crash_resumes + 1)]
    return [
        AutomationCore(
            name=RESUME_CRASHED,
            description=(
                f"A crashed deployment run of {FLOW_NAME} is rescheduled and resumes its job from the "
                f"last checkpoint, up to {policy.max_crash_resumes} times per flow run (irefine setup)."
            ),
            trigger=_refine_run_stuck(
                after={"prefect.flow-run.Crashed"},
                expect={f"prefect.flow-run.{state}" for state in _MOVED_ON},
                within=policy.crash_settle,
                match={"prefect.run-count": run_counts},
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.SCHEDULED,
                    name="AwaitingRetry",
                    force=False,
                    message=f"Crashed: rescheduled by the {RESUME_CRASHED} automation to resume its job",
                ),
                *notify(RESUME_SUBJECT, RESUME_BODY),
            ],
        ),
        AutomationCore(
            name=CRASH_SILENT,
            description=(
                f"A deployment run of {FLOW_NAME} that sends no heartbeat for "
                f"{policy.heartbeat_timeout.total_seconds():g} s while Running is marked Crashed "
                f"(then {RESUME_CRASHED} resumes it) (irefine setup)."
            ),
            trigger=_refine_run_stuck(
                after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat"}
                | {f"prefect.flow-run.{state}" for state in (*_MOVED_ON, "Crashed") if state != "Running"},
                within=policy.heartbeat_timeout,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    name="Crashed",
                    force=False,
                    message=(
                        f"no heartbeat for {policy.heartbeat_timeout.total_seconds():g} s: marked "
                        f"Crashed by the {CRASH_SILENT} automation"
                    ),
                ),
            ],
        ),
        AutomationCore(
            name=STUCK_PENDING,
            description=(
                f"A deployment run of {FLOW_NAME} still Pending {policy.pending_timeout.total_seconds():g} s "
                "after a worker claimed it is rescheduled: its worker died before starting it (setup)."
            ),
            trigger=_refine_run_stuck(
                after={"prefect.flow-run.Pending"},
                expect={
                    f"prefect.flow-run.{state}" for state in (*_MOVED_ON, "Crashed") if state != "Pending"
                },
                within=policy.pending_timeout,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.SCHEDULED,
                    name="AwaitingRetry",
                    force=True,
                    message=(
                        f"Pending for {policy.pending_timeout.total_seconds():g} s without starting: "
                        f"rescheduled by the {STUCK_PENDING} automation"
                    ),
                ),
            ],
        ),
        AutomationCore(
            name=PAUSE_ON_FAILURES,
            description=(
                f"{policy.failure_burst} failed or crashed {FLOW_NAME} runs on one work queue within "
                f"{policy.failure_window.total_seconds():g} s pause that queue (irefine setup)."
            ),
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=[_refine_flow(), {"prefect.resource.role": "work-queue"}],
                for_each={"related:work-queue:prefect.resource.id"},
                posture=Posture.Reactive,
                threshold=policy.failure_burst,
                within=policy.failure_window,
            ),
            actions=[
                PauseWorkQueue(source="inferred", work_queue_id=None),
                *notify(BURST_SUBJECT, BURST_BODY),
            ],
        ),
        job_event_alert(
            DEADLINE_ALERT,
            f"A job past its deadline ({DEADLINE_EVENT}) raises an alert (irefine setup).",
            DEADLINE_EVENT,
            DEADLINE_SUBJECT,
            DEADLINE_BODY,
        ),
        job_event_alert(
            ANOMALY_ALERT,
            f"Anomalies of a job ({ANOMALY_EVENTS}) notify (irefine setup).",
            ANOMALY_EVENTS,
            ANOMALY_SUBJECT,
            ANOMALY_BODY,
        ),
    ]


def _webhook_block(url: str) -> CustomWebhookNotificationBlock:
    return CustomWebhookNotificationBlock(
        name="irefine",
        url="{{webhook_url}}",
        json_data=dict(WEBHOOK_JSON),
        headers=None,
        cookies=None,
        secrets={"webhook_url": url},  # type: ignore[arg-type]  # pydantic coerces the dict
    )


def _where(url: str) -> str:
    """The webhook's scheme and host, for the report (its path may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check_webhook_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; a ValueError naming the problem otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"notify webhook {url!r} (--notify-webhook or IRE_NOTIFY_WEBHOOK_URL): give an http:// or "
            "https:// URL with a host"
        )
    return url


async def ensure_notify_block(client: PrefectClient, report: SetupReport, url: str | None) -> UUID | None:
    """Create or update the webhook block ``irefine-notify``; its id, or None without URL nor block."""
    slug = CustomWebhookNotificationBlock.get_block_type_slug()
    try:
        existing = await client.read_block_document_by_name(
            NOTIFY_BLOCK, block_type_slug=slug, include_secrets=True
        )
    except ObjectNotFound:
        existing = None
    if url is None:
        if existing is None:
            return None
        stored = (existing.data.get("secrets") or {}).get("webhook_url", "")
        report.add("notification-block", NOTIFY_BLOCK, "unchanged", f"webhook to {_where(str(stored))}")
        return existing.id
    block = _webhook_block(check_webhook_url(url))
    detail = f"webhook to {_where(url)}"
    if existing is not None:
        wanted = {"url": block.url, "json_data": block.json_data, "secrets": {"webhook_url": url}}
        if all(existing.data.get(key) == value for key, value in wanted.items()):
            report.add("notification-block", NOTIFY_BLOCK, "unchanged", detail)
            return existing.id
    block_id = await block.asave(NOTIFY_BLOCK, overwrite=True, client=client)
    report.add("notification-block", NOTIFY_BLOCK, "created" if existing is None else "updated", detail)
    return block_id


def _same(existing: AutomationCore, wanted: AutomationCore) -> bool:
    fields = (
        "name",
        "description",
        "enabled",
        "trigger",
        "actions",
        "actions_on_trigger",
        "actions_on_resolve",
    )
    return all(getattr(existing, f) == getattr(wanted, f) for f in fields)


async def ensure_automation(
    client: PrefectClient, report: SetupReport, wanted: AutomationCore, detail: str
) -> UUID:
    """Create ``wanted``, or bring the automation of that name back to it (extra copies are deleted)."""
    found = await client.read_automations_by_name(wanted.name)
    if not found:
        automation_id = await client.create_automation(wanted)
        report.add("automation", wanted.name, "created", detail)
        return automation_id
    first, *extra = found
    for duplicate in extra:
        await client.delete_automation(duplicate.id)
    if extra or not _same(first, wanted):
        # Not client.update_automation: it sends model_dump(exclude_unset=True), which drops each
        # action's default `type`, and the server then reads PauseWorkQueue(source="inferred") as
        # RunDeployment(source="inferred"). The full document keeps every action what it is.
        response = await client.request(
            "PUT",
            "/automations/{id}",
            path_params={"id": first.id},
            json=wanted.model_dump(mode="json", exclude={"owner_resource"}),
        )
        response.raise_for_status()
        report.add("automation", wanted.name, "updated", detail)
    else:
        report.add("automation", wanted.name, "unchanged", detail)
    return first.id


async def ensure_automations(
    client: PrefectClient,
    report: SetupReport,
    notify_webhook_url: str | None = None,
    policy: AutomationPolicy | None = None,
) -> None:
    """Create or update the notification block (when there is a URL) and the automations."""
    policy = policy or AutomationPolicy()
    block_id = await ensure_notify_block(client, report, notify_webhook_url)
    details = {
        RESUME_CRASHED: (
            f"at most {policy.max_crash_resumes} resumes per flow run, "
            f"{policy.crash_settle.total_seconds():g} s after the crash"
        ),
        CRASH_SILENT: f"Running without a heartbeat for {policy.heartbeat_timeout.total_seconds():g} s",
        STUCK_PENDING: f"Pending for {policy.pending_timeout.total_seconds():g} s without starting",
        PAUSE_ON_FAILURES: (
            f"{policy.failure_burst} failed or crashed runs of a queue within "
            f"{policy.failure_window.total_seconds():g} s pause it"
        ),
    }
    for wanted in automation_specs(block_id, policy):
        detail = details.get(wanted.name, "")
        if block_id is None:
            detail = f"{detail}; {NO_NOTIFY}" if detail else NO_NOTIFY
        await ensure_automation(client, report, wanted, detail)
