"""SLA router: pick the work-pool queue for a job from its deadline, urgency and the current load.

Pure and deterministic: no clock, no I/O, no framework. The caller reads the load (from Prefect) and
the time of submission, and records the returned :class:`Route` (queue, priority and a one-line
reason) with the job.

Queues ``critical``, ``high``, ``normal``, ``low`` have priorities 1-4; 1 is served first.

Wait model (:func:`estimate_wait`), simple and on the safe side:

* *Ahead* of a job on queue ``q`` are the flow runs waiting on ``q`` and on every queue served
  before it (a waterfall: a job on ``high`` waits behind everything waiting on ``critical`` and
  ``high``). The job itself is number ``ahead + 1`` in line.
* *Free* slots are ``min(q's free slots, the global free slots)``; *capacity* is
  ``min(q's limit, the global job limit)``. ``None`` means unlimited.
* If the job's place in line fits the free slots (or nothing limits ``q``) it starts at once.
  Otherwise slots open at a rate of ``capacity / average_run_seconds``, so the job starts after
  ``(ahead + 1 - free) * average_run_seconds / capacity`` seconds. A capacity of 0 (a paused
  queue) never starts anything: the wait is infinite.

A deadline is *met* on a queue when ``start + estimated run + margin <= time left``, where the
margin is the larger of 30 s and 10% of the time left (ties meet).

Rules, first match wins:

1. Invalid input (negative or non-finite seconds, naive datetimes, an unknown urgency, unknown
   queue names in the load) raises :class:`SpecError` with one line naming what to change.
2. An explicit urgency (``--priority``) wins: the job goes to that queue ("requested priority").
   With a deadline the queue cannot meet, the job is escalated to the lowest higher queue that
   meets it ("escalated from normal: deadline needs high"); if no queue meets it (or it has already
   passed), the job stays on the requested queue and is flagged ``at_risk``.
3. A deadline already past at submission: ``critical``, ``at_risk``.
4. A deadline and no urgency: the lowest-priority (cheapest) queue that meets it, trying ``low``,
   ``normal``, ``high``, ``critical`` in turn; if none does, ``critical`` with ``at_risk`` and the
   reason "deadline cannot be met even on critical: needs Xs, has Ys".
5. Neither: ``normal``. A busy ``normal`` is never silently traded for an idle ``low``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from engine.core.errors import SpecError

if TYPE_CHECKING:
    from engine.core.spec import JobSpec

QueueName = Literal["critical", "high", "normal", "low"]

QUEUES: tuple[QueueName, ...] = ("critical", "high", "normal", "low")
"""Work-pool queues in the order they are served."""

QUEUE_PRIORITY: Mapping[str, int] = MappingProxyType({"critical": 1, "high": 2, "normal": 3, "low": 4})
"""Prefect work-queue priority of each queue: 1 is served first."""

DEFAULT_QUEUE: QueueName = "normal"
MIN_MARGIN_SECONDS = 30.0
MARGIN_SHARE = 0.1
_TIE = 1e-9  # seconds: float noise that still counts as meeting the deadline


def _check_queue(name: object, what: str) -> None:
    if name not in QUEUE_PRIORITY:
        raise SpecError(f"{what}: unknown queue {name!r}; use one of {', '.join(QUEUES)}")


def _check_seconds(value: float, what: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{what}: {value!r} must be a finite number of seconds >= 0")


def _check_count(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise SpecError(f"{what}: {value!r} must be >= 0")


def _check_aware(value: datetime | None, what: str) -> None:
    if value is not None and value.utcoffset() is None:
        raise SpecError(f"{what}: {value.isoformat()} has no time zone; give an aware datetime (e.g. UTC)")


def _min_limit(a: int | None, b: int | None) -> int | None:
    """The tighter of two limits, where ``None`` means unlimited."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _secs(value: float) -> str:
    return f"{value:.0f}s" if math.isfinite(value) else "inf"


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """One queue's load: flow runs waiting and running, and its concurrency limit (None: unlimited)."""

    name: str
    waiting: int = 0
    running: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        _check_queue(self.name, "load")
        _check_count(self.waiting, f"load.{self.name}.waiting")
        _check_count(self.running, f"load.{self.name}.running")
        _check_count(self.limit, f"load.{self.name}.limit")

    @property
    def free_slots(self) -> int | None:
        """Runs the queue could start now; ``None`` when it has no limit."""
        return None if self.limit is None else max(0, self.limit - self.running)


@dataclass(frozen=True, slots=True)
class Load:
    """The work pool's current load: per-queue counts and the global running-jobs limit.

    Queues missing from ``queues`` are empty and unlimited, so ``Load()`` is an idle pool.
    """

    queues: Mapping[str, QueueLoad] = field(default_factory=dict)
    running_jobs: int = 0
    job_limit: int | None = None

    def __post_init__(self) -> None:
        for key, entry in self.queues.items():
            _check_queue(key, "load")
            if entry.name != key:
                raise SpecError(f"load: entry {key!r} describes queue {entry.name!r}; key it by its name")
        _check_count(self.running_jobs, "load.running_jobs")
        _check_count(self.job_limit, "load.job_limit")
        object.__setattr__(self, "queues", MappingProxyType(dict(self.queues)))

    def queue(self, name: str) -> QueueLoad:
        """The load of queue ``name`` (empty and unlimited when not given)."""
        _check_queue(name, "queue")
        return self.queues.get(name) or QueueLoad(name)

    @property
    def free_slots(self) -> int | None:
        """Jobs the global limit lets start now; ``None`` when there is no global limit."""
        return None if self.job_limit is None else max(0, self.job_limit - self.running_jobs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What the submitter asked for: an explicit urgency and/or an aware deadline, and the run time."""

    urgency: QueueName | None = None
    deadline: datetime | None = None
    estimated_seconds: float
    submitted_at: datetime

    def __post_init__(self) -> None:
        if self.urgency is not None:
            _check_queue(self.urgency, "priority")
        _check_seconds(self.estimated_seconds, "estimated_seconds")
        _check_aware(self.submitted_at, "submitted_at")
        _check_aware(self.deadline, "deadline")

    @classmethod
    def from_spec(
        cls,
        spec: JobSpec,
        *,
        submitted_at: datetime,
        urgency: QueueName | None = None,
        deadline: datetime | None = None,
        estimated_seconds: float | None = None,
    ) -> Request:
        """A request for ``spec``: the deadline defaults to the spec's, the run time to ``max_seconds``."""
        seconds = estimated_seconds if estimated_seconds is not None else spec.max_seconds
        if seconds is None:
            raise SpecError("estimated_seconds: give an estimated run time or set max_seconds in the spec")
        return cls(
            estimated_seconds=seconds,
            submitted_at=submitted_at,
            urgency=urgency,
            deadline=deadline if deadline is not None else spec.deadline,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """Where a job goes and why.

    ``at_risk``: the deadline cannot be met (with margin) on any queue, the job's included.
    ``slack_seconds``: time to spare at the deadline on the chosen queue, before the margin; negative
    when late; ``None`` without a deadline. ``estimated_finish`` is ``None`` when the queue never starts.
    """

    queue: QueueName
    priority: int
    reason: str
    at_risk: bool = False
    estimated_start_seconds: float = 0.0
    estimated_finish: datetime | None = None
    slack_seconds: float | None = None


def estimate_wait(queue: str, load: Load, average_run_seconds: float) -> float:
    """Seconds until a job submitted now to ``queue`` starts (see the module docstring); may be inf."""
    _check_queue(queue, "queue")
    _check_seconds(average_run_seconds, "average_run_seconds")
    rank = QUEUE_PRIORITY[queue]
    ahead = sum(load.queue(q).waiting for q in QUEUES if QUEUE_PRIORITY[q] <= rank)
    own = load.queue(queue)
    capacity = _min_limit(own.limit, load.job_limit)
    free = _min_limit(own.free_slots, load.free_slots)
    if capacity == 0:
        return math.inf
    if capacity is None or free is None:  # nothing limits the queue
        return 0.0
    behind = ahead + 1 - free
    if behind <= 0:
        return 0.0
    return behind * average_run_seconds / capacity


@dataclass(frozen=True, slots=True)
class _Fit:
    """How a job would fare on one queue; times in seconds after submission."""

    queue: QueueName
    start: float
    run: float
    margin: float
    left: float | None  # until the deadline; None without one

    @property
    def finish(self) -> float:
        return self.start + self.run

    @property
    def meets(self) -> bool:
        return self.left is not None and self.finish + self.margin <= self.left + _TIE

    @property
    def slack(self) -> float | None:
        return None if self.left is None else self.left - self.finish

    def start_text(self) -> str:
        if not math.isfinite(self.start):
            return f"{self.queue} never starts (concurrency limit 0)"
        return f"estimated start in {_secs(self.start)}"

    def summary(self) -> str:
        has = _secs(self.left or 0.0)
        if not math.isfinite(self.start):
            return f"{self.queue} never starts (concurrency limit 0), has {has}"
        needs = self.finish + self.margin
        return (
            f"needs {_secs(needs)} (start {_secs(self.start)} + run {_secs(self.run)}"
            f" + margin {_secs(self.margin)}), has {has}"
        )


def _fit(queue: QueueName, request: Request, load: Load, average: float) -> _Fit:
    start = estimate_wait(queue, load, average)
    if request.deadline is None:
        return _Fit(queue, start, request.estimated_seconds, 0.0, None)
    left = (request.deadline - request.submitted_at).total_seconds()
    margin = max(MIN_MARGIN_SECONDS, max(left, 0.0) * MARGIN_SHARE)
    return _Fit(queue, start, request.estimated_seconds, margin, left)


def _route(fit: _Fit, request: Request, reason: str, *, at_risk: bool = False) -> Route:
    finish = request.submitted_at + timedelta(seconds=fit.finish) if math.isfinite(fit.finish) else None
    return Route(
        queue=fit.queue,
        priority=QUEUE_PRIORITY[fit.queue],
        reason=reason,
        at_risk=at_risk,
        estimated_start_seconds=fit.start,
        estimated_finish=finish,
        slack_seconds=fit.slack,
    )


def route(request: Request, load: Load, *, average_run_seconds: float | None = None) -> Route:
    """Pick the queue for ``request`` under ``load`` by the rules of the module docstring.

    ``average_run_seconds`` is the run time of the jobs ahead; by default the job's own estimate.
    """
    average = request.estimated_seconds if average_run_seconds is None else average_run_seconds
    _check_seconds(average, "average_run_seconds")
    fits = {q: _fit(q, request, load, average) for q in QUEUES}
    critical = fits["critical"]
    left = critical.left
    passed = left is not None and left <= 0
    missed = (
        f"deadline already passed {_secs(abs(left))} before submission"
        if passed and left is not None
        else f"deadline cannot be met even on critical: {critical.summary()}"
    )

    if request.urgency is not None:
        asked = fits[request.urgency]
        head = f"requested priority {request.urgency}"
        if left is None:
            return _route(asked, request, f"{head}; {asked.start_text()}")
        if asked.meets:
            return _route(
                asked, request, f"{head}; meets the deadline with {_secs(asked.slack or 0.0)} slack"
            )
        rank = QUEUE_PRIORITY[request.urgency]
        for q in reversed(QUEUES[: rank - 1]):
            if fits[q].meets:
                why = f"escalated from {request.urgency}: deadline needs {q} ({fits[q].summary()})"
                return _route(fits[q], request, why)
        return _route(asked, request, f"{head}; {missed}", at_risk=True)

    if left is None:
        default = fits[DEFAULT_QUEUE]
        why = f"no deadline or priority: default {DEFAULT_QUEUE}; {default.start_text()}"
        return _route(default, request, why)
    if passed:
        return _route(critical, request, missed, at_risk=True)
    for q in reversed(QUEUES):
        if fits[q].meets:
            return _route(
                fits[q], request, f"{q} is the cheapest queue meeting the deadline: {fits[q].summary()}"
            )
    return _route(critical, request, missed, at_risk=True)
