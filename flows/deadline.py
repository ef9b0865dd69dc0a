"""The deadline observer: a job still short of its target when its spec's deadline passes emits the
Prefect event ``refinement.deadline.missed``, which the ``irefine-deadline-missed`` automation
turns into a notification (deployments/automations.py).

A timer fires at the deadline itself, so a job whose cycles take minutes is reported on time, not
at the end of the cycle running then; ``finish`` covers a job that stops by the deadline rule
before the timer fired and one that started after its deadline. The event is emitted at most once
per flow run, and its id is derived from the job id, so the server records and acts on it once
per job even when a resumed run emits it again. Emitting only queues the event: Prefect's events
worker sends it from its own thread.
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from engine.core import JobSpec, Progress
from engine.runner import Job
from flows.observers import ObserverContext

DEADLINE_EVENT = "refinement.deadline.missed"
_EVENT_IDS = uuid.UUID("6f1d9a53-2b1e-4d7e-9d0c-5a8c3e2f7b10")  # namespace of the event ids


def deadline_event_id(job_id: str) -> uuid.UUID:
    """The id of a job's deadline event: the same for every run of the job."""
    return uuid.uuid5(_EVENT_IDS, f"{DEADLINE_EVENT}:{job_id}")


def aware(moment: datetime) -> datetime:
    """``moment`` with a time zone; a naive deadline is UTC, as the stop rule reads it."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def target_reached(spec: JobSpec, progress: Progress, maximize: bool) -> bool:
    """Whether the job's best meets its target (never, for a job without one)."""
    if spec.target is None or progress.best_score is None:
        return False
    return progress.best_score >= spec.target if maximize else progress.best_score <= spec.target


class DeadlineObserver:
    """Emits ``refinement.deadline.missed`` once if the deadline passes before the target is met."""

    def __init__(self, job: Job, deadline: datetime, flow_run_id: str | None) -> None:
        self._job = job
        self._deadline = deadline
        self._flow_run_id = flow_run_id
        self._lock = threading.Lock()
        self._sent = False
        self._done = False
        delay = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
        # The timer thread runs in a copy of this context: the flow run's Prefect settings and client.
        self._timer = threading.Timer(delay, contextvars.copy_context().run, args=(self._at_deadline,))
        self._timer.daemon = True
        self._timer.name = f"deadline-{job.job_id}"
        self._timer.start()

    def __call__(self, job: Job, record: Any) -> tuple[()]:
        self._job = job  # the timer reads the progress of the latest cycle
        return ()

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        self._timer.cancel()
        self._job = job
        if result is not None:
            how = f"stopped: {result.get('stop_reason')}"
        elif error is not None:
            how = f"ended with {type(error).__name__}: {error}"[:500]
        else:
            how = "ended"
        self._maybe_emit(how)
        with self._lock:
            self._done = True

    def _at_deadline(self) -> None:
        self._maybe_emit("still running")

    def _maybe_emit(self, how: str) -> None:
        job = self._job
        with self._lock:
            if self._sent or self._done or datetime.now(UTC) < self._deadline:
                return
            if target_reached(job.spec, job.progress, job.maximize):
                return
            self._sent = True
        self._emit(job, how)

    def _emit(self, job: Job, how: str) -> None:
        from prefect.events import emit_event

        progress = job.progress
        goal = "its target" if job.spec.target is not None else "the end of its run"
        message = (
            f"deadline {self._deadline.isoformat()} passed before {goal} ({how}); "
            f"best score {progress.best_score} after {progress.cycles} cycles"
        )
        related = []
        if self._flow_run_id:
            related.append(
                {
                    "prefect.resource.id": f"prefect.flow-run.{self._flow_run_id}",
                    "prefect.resource.role": "flow-run",
                }
            )
        emit_event(
            DEADLINE_EVENT,
            resource={
                "prefect.resource.id": f"irefine.job.{job.job_id}",
                "prefect.resource.name": job.job_id,
            },
            related=related,
            payload={
                "job_id": job.job_id,
                "deadline": self._deadline.isoformat(),
                "target": job.spec.target,
                "best_score": progress.best_score,
                "cycles": progress.cycles,
                "evaluations": progress.evaluations,
                "how": how,
                "message": message,
            },
            id=deadline_event_id(job.job_id),
        )


def deadline_observer(job: Job, context: ObserverContext) -> DeadlineObserver | None:
    """The observer of a job with a deadline (None for a job without one)."""
    if job.spec.deadline is None:
        return None
    return DeadlineObserver(job, aware(job.spec.deadline), context.flow_run_id)
