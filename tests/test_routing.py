"""Unit tests of the SLA router (engine/routing.py): a decision table, the wait model, bad input."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from engine.core import JobSpec, SpecError
from engine.routing import (
    QUEUE_PRIORITY,
    QUEUES,
    Load,
    QueueLoad,
    Request,
    Route,
    estimate_wait,
    route,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def make_load(
    waiting: dict[str, int] | None = None,
    running: dict[str, int] | None = None,
    limits: dict[str, int | None] | None = None,
    running_jobs: int = 0,
    job_limit: int | None = None,
) -> Load:
    waiting, running, limits = waiting or {}, running or {}, limits or {}
    names = set(waiting) | set(running) | set(limits)
    queues = {
        n: QueueLoad(n, waiting=waiting.get(n, 0), running=running.get(n, 0), limit=limits.get(n))
        for n in names
    }
    return Load(queues=queues, running_jobs=running_jobs, job_limit=job_limit)


def make_request(
    est: float = 100.0, deadline_in: float | None = None, urgency: Any = None, at: datetime = T0
) -> Request:
    deadline = None if deadline_in is None else at + timedelta(seconds=deadline_in)
    return Request(urgency=urgency, deadline=deadline, estimated_seconds=est, submitted_at=at)


@dataclass(frozen=True)
class Row:
    description: str
    request: dict[str, Any]
    load: dict[str, Any]
    queue: str
    at_risk: bool
    reason: str
    average: float | None = None

    def __str__(self) -> str:
        return self.description


BUSY = {"limits": {q: 1 for q in QUEUES}, "running": {q: 1 for q in QUEUES}}

ROWS = [
    # -- rule 5: neither deadline nor urgency -> normal
    Row("empty load, no deadline: default normal", {}, {}, "normal", False, "default normal"),
    Row(
        "normal saturated, low idle: still normal, never demoted",
        {},
        {"waiting": {"normal": 10}, "running": {"normal": 2}, "limits": {"normal": 2, "low": 5}},
        "normal",
        False,
        "default normal; estimated start in 550s",
    ),
    Row(
        "normal paused (limit 0): still normal, reason says it never starts",
        {},
        {"limits": {"normal": 0}},
        "normal",
        False,
        "normal never starts",
    ),
    # -- rule 2: explicit urgency wins, escalates, or flags
    Row("urgency, no deadline", {"urgency": "high"}, {}, "high", False, "requested priority high"),
    Row(
        "urgency low, deadline met on low: stays low",
        {"urgency": "low", "deadline_in": 1000},
        {},
        "low",
        False,
        "requested priority low; meets the deadline with 900s slack",
    ),
    Row(
        "urgency high, generous deadline: not demoted to a cheaper queue",
        {"urgency": "high", "deadline_in": 10_000},
        {},
        "high",
        False,
        "requested priority high",
    ),
    Row(
        "escalation: normal busy, deadline needs high (lowest meeting queue, not critical)",
        {"urgency": "normal", "deadline_in": 1000},
        {"waiting": {"normal": 9}, "running": {"normal": 1}, "limits": {"normal": 1}},
        "high",
        False,
        "escalated from normal: deadline needs high",
    ),
    Row(
        "escalation: low and high busy, deadline needs critical",
        {"urgency": "low", "deadline_in": 1000},
        {
            "waiting": {"high": 9},
            "running": {"high": 1, "normal": 1, "low": 1},
            "limits": {"high": 1, "normal": 1, "low": 1},
        },
        "critical",
        False,
        "escalated from low: deadline needs critical",
    ),
    Row(
        "urgency with an unmeetable deadline: stays on the requested queue, at risk",
        {"urgency": "normal", "est": 1000, "deadline_in": 500},
        {},
        "normal",
        True,
        "requested priority normal; deadline cannot be met even on critical: needs 1050s",
    ),
    Row(
        "urgency critical, unmeetable deadline",
        {"urgency": "critical", "est": 1000, "deadline_in": 500},
        {},
        "critical",
        True,
        "deadline cannot be met even on critical",
    ),
    Row(
        "urgency with a past deadline: stays, at risk",
        {"urgency": "low", "deadline_in": -60},
        {},
        "low",
        True,
        "requested priority low; deadline already passed 60s before submission",
    ),
    # -- rule 3: a deadline already past
    Row(
        "deadline already past: critical, at risk",
        {"deadline_in": -60},
        {},
        "critical",
        True,
        "deadline already passed 60s",
    ),
    Row(
        "deadline exactly at submission counts as passed",
        {"deadline_in": 0},
        {},
        "critical",
        True,
        "deadline already passed 0s",
    ),
    # -- rule 4: deadline, no urgency -> cheapest queue that meets it
    Row("idle pool: low", {"deadline_in": 1000}, {}, "low", False, "low is the cheapest queue"),
    Row(
        "low busy: normal",
        {"deadline_in": 1000},
        {"waiting": {"low": 8}, "running": {"low": 1}, "limits": {"low": 1}},
        "normal",
        False,
        "normal is the cheapest queue",
    ),
    Row(
        "waterfall: empty low waits behind every line above it, high is the cheapest that meets it",
        {"deadline_in": 1000},
        {"waiting": {"critical": 3, "high": 3, "normal": 3}, **BUSY},
        "high",
        False,
        "high is the cheapest queue meeting the deadline: needs 900s (start 700s",
    ),
    Row(
        "deadline exactly at the 10% margin: met",
        {"est": 900, "deadline_in": 1000},
        {},
        "low",
        False,
        "needs 1000s (start 0s + run 900s + margin 100s), has 1000s",
    ),
    Row(
        "one second past the 10% margin: at risk",
        {"est": 901, "deadline_in": 1000},
        {},
        "critical",
        True,
        "deadline cannot be met even on critical: needs 1001s",
    ),
    Row(
        "deadline exactly at the 30 s minimum margin: met",
        {"est": 170, "deadline_in": 200},
        {},
        "low",
        False,
        "margin 30s), has 200s",
    ),
    Row(
        "one second past the 30 s minimum margin: at risk",
        {"est": 171, "deadline_in": 200},
        {},
        "critical",
        True,
        "needs 201s (start 0s + run 171s + margin 30s), has 200s",
    ),
    Row(
        "all queues saturated, critical still meets it",
        {"deadline_in": 600},
        {"waiting": {q: 2 for q in QUEUES}, **BUSY},
        "critical",
        False,
        "critical is the cheapest queue meeting the deadline: needs 460s",
    ),
    Row(
        "all queues saturated, nothing meets it",
        {"deadline_in": 350},
        {"waiting": {q: 2 for q in QUEUES}, **BUSY},
        "critical",
        True,
        "deadline cannot be met even on critical: needs 435s",
    ),
    Row(
        "global job limit reached, queues unlimited: low waits for a free slot but meets it",
        {"deadline_in": 1000},
        {"running_jobs": 4, "job_limit": 4},
        "low",
        False,
        "start 25s",
    ),
    Row(
        "global job limit reached with a long line: at risk",
        {"deadline_in": 600},
        {"waiting": {"critical": 10}, "running_jobs": 2, "job_limit": 2},
        "critical",
        True,
        "needs 710s (start 550s + run 100s + margin 60s), has 600s",
    ),
    Row(
        "every queue paused: at risk",
        {"deadline_in": 600},
        {"limits": {q: 0 for q in QUEUES}},
        "critical",
        True,
        "critical never starts (concurrency limit 0)",
    ),
    Row(
        "average run time of the jobs ahead, not the job's own, sets the wait",
        {"est": 10, "deadline_in": 2000},
        {"waiting": {"low": 2}, "running": {"low": 1}, "limits": {"low": 1}},
        "normal",
        False,
        "normal is the cheapest queue",
        average=1000,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_route_decision_table(row: Row) -> None:
    request = make_request(**row.request)
    got = route(request, make_load(**row.load), average_run_seconds=row.average)
    assert (got.queue, got.at_risk) == (row.queue, row.at_risk), got.reason
    assert row.reason in got.reason
    assert "\n" not in got.reason
    assert got.priority == QUEUE_PRIORITY[got.queue]
    if request.deadline is None:
        assert got.slack_seconds is None
    else:
        assert got.slack_seconds is not None
    if math.isfinite(got.estimated_start_seconds):
        expected = T0 + timedelta(seconds=got.estimated_start_seconds + request.estimated_seconds)
        assert got.estimated_finish == expected
    else:
        assert got.estimated_finish is None


def test_route_fields() -> None:
    load = make_load(waiting={"low": 1}, running={"low": 1}, limits={"low": 1})
    got = route(make_request(est=100, deadline_in=1000), load)
    assert got == Route(
        queue="low",
        priority=4,
        reason="low is the cheapest queue meeting the deadline: "
        "needs 400s (start 200s + run 100s + margin 100s), has 1000s",
        at_risk=False,
        estimated_start_seconds=200.0,
        estimated_finish=T0 + timedelta(seconds=300),
        slack_seconds=700.0,
    )


# -- the wait model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "load", "expected"),
    [
        ("critical", Load(), 0.0),
        ("low", make_load(waiting={q: 100 for q in QUEUES}), 0.0),  # nothing limits it
        ("high", make_load(waiting={"critical": 3}, running={"high": 2}, limits={"high": 2}), 120.0),
        ("critical", make_load(waiting={"high": 5}, limits={"critical": 1}), 0.0),  # lower lines don't count
        ("normal", make_load(waiting={"normal": 2}, running={"normal": 1}, limits={"normal": 5}), 0.0),
        ("normal", make_load(waiting={"normal": 5}, running={"normal": 1}, limits={"normal": 5}), 24.0),
        ("low", make_load(running_jobs=3, job_limit=3), 20.0),  # global limit, queue unlimited
        ("low", make_load(limits={"low": 10}, running_jobs=3, job_limit=3), 20.0),  # tighter of the two
        ("low", make_load(running={"low": 4}, limits={"low": 2}), 30.0),  # running above a lowered limit
        ("low", make_load(limits={"low": 0}), math.inf),
        ("low", make_load(job_limit=0), math.inf),
    ],
)
def test_estimate_wait(queue: str, load: Load, expected: float) -> None:
    assert estimate_wait(queue, load, 60.0) == pytest.approx(expected)


def test_free_slots() -> None:
    assert QueueLoad("low").free_slots is None
    assert QueueLoad("low", running=1, limit=3).free_slots == 2
    assert QueueLoad("low", running=5, limit=3).free_slots == 0
    assert Load().free_slots is None
    assert Load(running_jobs=7, job_limit=5).free_slots == 0


def test_queues_constants() -> None:
    assert QUEUES == ("critical", "high", "normal", "low")
    assert dict(QUEUE_PRIORITY) == {"critical": 1, "high": 2, "normal": 3, "low": 4}


# -- determinism ------------------------------------------------------------------------------------


def test_route_is_deterministic_and_order_independent() -> None:
    waiting = {"critical": 2, "high": 3, "normal": 4, "low": 5}
    running: dict[str, int] = {q: 1 for q in QUEUES}
    limits: dict[str, int | None] = {q: 2 for q in QUEUES}
    forward = make_load(waiting, running, limits, running_jobs=4, job_limit=6)
    backward = Load(queues=dict(reversed(list(forward.queues.items()))), running_jobs=4, job_limit=6)
    for kwargs in ({}, {"deadline_in": 700}, {"deadline_in": 200}, {"urgency": "low", "deadline_in": 700}):
        first = route(make_request(**kwargs), forward)
        assert route(make_request(**kwargs), forward) == first
        assert route(make_request(**kwargs), backward) == first


def test_route_depends_on_time_left_not_the_clock_or_zone() -> None:
    later = datetime(2031, 6, 1, 8, 0, tzinfo=timezone(timedelta(hours=5)))
    a = route(make_request(deadline_in=1000), Load())
    b = route(make_request(deadline_in=1000, at=later), Load())
    assert (a.queue, a.reason, a.slack_seconds) == (b.queue, b.reason, b.slack_seconds)


def test_load_is_read_only() -> None:
    source = {"low": QueueLoad("low", waiting=1)}
    load = Load(queues=source)
    source["normal"] = QueueLoad("normal")
    assert set(load.queues) == {"low"}
    with pytest.raises(TypeError):
        load.queues["high"] = QueueLoad("high")  # type: ignore[index]


def test_routing_imports_no_framework() -> None:
    banned = {"prefect", "dask", "distributed", "redis", "sqlmodel", "sqlalchemy"}
    tree = ast.parse((ROOT / "engine" / "routing.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        assert not {n.split(".")[0] for n in names} & banned, names


# -- bad input --------------------------------------------------------------------------------------

NAIVE = datetime(2025, 1, 1, 12, 0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: make_request(est=-1), "estimated_seconds: -1"),
        (lambda: make_request(est=math.nan), "estimated_seconds: nan"),
        (lambda: make_request(est=math.inf), "estimated_seconds: inf"),
        (lambda: make_request(at=NAIVE), "submitted_at: .* has no time zone"),
        (lambda: Request(deadline=NAIVE, estimated_seconds=1, submitted_at=T0), "deadline: .* no time zone"),
        (lambda: make_request(urgency="urgent"), "priority: unknown queue 'urgent'; use one of critical"),
        (lambda: QueueLoad("bulk"), "load: unknown queue 'bulk'"),
        (lambda: Load(queues={"bulk": QueueLoad("low")}), "load: unknown queue 'bulk'"),
        (lambda: Load(queues={"high": QueueLoad("low")}), "entry 'high' describes queue 'low'"),
        (lambda: QueueLoad("low", waiting=-1), r"load\.low\.waiting: -1 must be >= 0"),
        (lambda: QueueLoad("low", limit=-2), r"load\.low\.limit"),
        (lambda: Load(running_jobs=-1), r"load\.running_jobs"),
        (lambda: Load(job_limit=-1), r"load\.job_limit"),
        (lambda: route(make_request(), Load(), average_run_seconds=-5), "average_run_seconds: -5"),
        (lambda: estimate_wait("bulk", Load(), 1.0), "queue: unknown queue 'bulk'"),
        (lambda: estimate_wait("low", Load(), math.nan), "average_run_seconds"),
    ],
)
def test_bad_input_raises_spec_error(build: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


# -- from a job spec --------------------------------------------------------------------------------


def test_request_from_spec() -> None:
    deadline = T0 + timedelta(hours=1)
    spec = JobSpec(problem="sphere", max_seconds=600, deadline=deadline)
    req = Request.from_spec(spec, submitted_at=T0)
    assert (req.estimated_seconds, req.deadline, req.urgency) == (600, deadline, None)
    other = T0 + timedelta(minutes=5)
    req = Request.from_spec(spec, submitted_at=T0, urgency="high", deadline=other, estimated_seconds=60)
    assert (req.estimated_seconds, req.deadline, req.urgency) == (60, other, "high")


def test_request_from_spec_needs_an_estimate() -> None:
    spec = JobSpec(problem="sphere", max_evaluations=10)
    with pytest.raises(SpecError, match="estimated_seconds: give an estimated run time"):
        Request.from_spec(spec, submitted_at=T0)


def test_request_from_spec_with_naive_deadline() -> None:
    spec = JobSpec(problem="sphere", max_seconds=60, deadline=NAIVE)
    with pytest.raises(SpecError, match=r"deadline: .* no time zone"):
        Request.from_spec(spec, submitted_at=T0)
