"""The priority scenario of issue 4, shared by ``tests/test_queues.py`` and ``bench/queues.py``.

On a given Prefect server: ``irefine setup`` twice, deploy ``refine``, submit jobs of mixed priority
through :func:`irefine.submit.submit_job` (what ``irefine submit`` calls), then start process
workers with ``irefine worker`` (after the submissions, so that every job waits at the same time)
and wait for every flow run to end. Every job writes to one shared job store.

What is measured, from the flow runs' state timestamps and the jobs' store records:

* *lost*: submitted jobs whose flow run did not complete or whose job is not ``completed``.
* *priority inversions*: pairs (L, H) where H is on a higher-priority queue than L, H was waiting
  (created, not yet taken) when the server chose L (the start of the worker poll that returned
  L; L's Pending time when no log says), H was taken more than ``grace`` seconds after L, and
  H's queue was below its concurrency limit at that moment: fewer of its runs were Pending or
  Running (taken and not ended, by when the server wrote those states) than its limit, the
  runs of H's queue that the same poll chose counted in.
  ``grace`` (two worker polls) absorbs that a worker takes the runs of one poll concurrently,
  so runs handed out together can reach Pending in any order. ``priority_inversions`` counts
  them all; ``inversions_concurrent_polls`` says how many of them came from a poll of the worker
  that took L overlapping a poll of the other worker (from the workers' debug logs): Prefect's
  queue query locks the runs it considers (``FOR UPDATE SKIP LOCKED``), more than it returns
  when slots are few, and a poll running at the same moment skips those and may return a
  lower-priority run. ``irefine worker`` polls in turns (deployments/worker.py), so
  *overlapping polls* (pairs of the two workers' polls that overlap in time) should be none.
* *running jobs*: a job runs from its creation in the store to its last write; in a deployment
  run both happen inside the flow's ``irefine-running-jobs`` slot. ``max_running`` is the
  largest number of those intervals that overlap.
* *rate limit*: over every window of the flow runs' creation times, the count beyond
  ``burst + rate * window`` (``rate_excess``; one slot of tolerance for the time between the
  granted slot and the created run).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from irefine.submit import Submission
from tests.prefect_project import ProcessWorker, deploy, irefine
from tests.prefect_server import drain_prefect

PRIORITY = {"critical": 1, "high": 2, "normal": 3, "low": 4}
PRIORITY_MIX = {"critical": 4, "high": 8, "normal": 10, "low": 8}
# 12 evaluations of 0.5 s of sleep: each job holds its running-jobs slot for about 6 s without
# using the CPU, so that jobs overlap and the limit is exercised on a small machine.
JOB_SPEC: dict[str, Any] = {
    "problem": "tests.problems_for_tests:Slow",
    "problem_params": {"ms": 500},
    "strategy": "random",
    "batch_size": 4,
    "max_cycles": 3,
}
SETUP_SUBMISSION_BURST = 10  # irefine setup's default burst of irefine-submissions


@dataclass(frozen=True)
class ScenarioConfig:
    """The knobs: jobs per queue, workers and their limits, the job limit and the submission rate.

    A worker's ``--limit`` is above the job limit, so that the pool limit (= the job limit), which
    the server applies in queue-priority order, is what binds: flow-run processes outlive their
    runs by seconds, and a worker with no room left would fetch runs only to leave them.
    """

    mix: Mapping[str, int] = field(default_factory=lambda: dict(PRIORITY_MIX))
    workers: int = 2
    worker_limit: int = 6
    job_limit: int = 3
    submission_rate: float = 2.0
    poll_seconds: float = 1.0
    timeout_seconds: float = 540.0
    seed: int = 4

    @property
    def jobs(self) -> int:
        return sum(self.mix.values())

    @property
    def grace_seconds(self) -> float:
        return 2 * self.poll_seconds


@dataclass(frozen=True)
class ObservedRun:
    """One submitted job: its flow run's times (epoch seconds; None if never reached) and its job."""

    job_id: str
    flow_run_id: str
    queue: str
    created: float
    # Pending (a worker took it) and the final state: when the server wrote the state (the Prefect
    # database's state row, when the scenario reads it), else when it received it.
    taken: float | None
    started: float | None  # Running
    ended: float | None
    state: str
    job_status: str | None  # None: no such job in the store
    job_started: float | None
    job_ended: float | None
    rate_limit_wait: float = 0.0  # seconds its submission waited for a rate-limit slot

    @property
    def completed(self) -> bool:
        return self.state == "Completed" and self.job_status == "completed"


def submission_order(mix: Mapping[str, int], seed: int) -> list[str]:
    """The queues of the jobs in submission order: a seeded shuffle, so that urgent jobs often
    come after routine ones (a first-come-first-served pool would then invert priorities)."""
    order = [queue for queue, count in mix.items() for _ in range(count)]
    random.Random(seed).shuffle(order)
    return order


def priority_inversions(
    runs: Sequence[ObservedRun],
    queue_limits: Mapping[str, int | None],
    grace: float,
    chosen_at: Mapping[str, float] | None = None,
) -> list[tuple[str, str]]:
    """(lower, higher) job-id pairs inverted as defined in the module docstring.

    ``chosen_at`` maps a job id to when the server chose its run (the start of the worker poll that
    returned it); the queues' load is judged then, as the server judged it. Without it, at the
    run's Pending time: a run of H's queue that ended between the poll and that moment would make
    H's queue look free when the server saw it full. Runs of H's queue that the same poll chose
    count as taken then: the server gave them H's queue's free slots before it gave the pool's
    remaining slots to lower queues.
    """
    chosen = chosen_at or {}
    inverted = []
    for low in runs:
        if low.taken is None:
            continue
        at = chosen.get(low.job_id, low.taken)
        same_poll = {job for job, poll in chosen.items() if poll == at} if low.job_id in chosen else set()
        for high in runs:
            if PRIORITY[high.queue] >= PRIORITY[low.queue] or high.created >= at:
                continue
            if high.taken is not None and high.taken <= low.taken + grace:
                continue
            limit = queue_limits.get(high.queue)
            busy = sum(
                1
                for r in runs
                if r.queue == high.queue
                and r.taken is not None
                and (r.taken <= at or r.job_id in same_poll)
                and at < (r.ended if r.ended is not None else math.inf)
            )
            if limit is None or busy < limit:
                inverted.append((low.job_id, high.job_id))
    return inverted


@dataclass(frozen=True)
class WorkerLog:
    """What a worker's debug log says: its polls (start, end) and the runs it took (time, id)."""

    polls: list[tuple[float, float]]
    took: dict[str, float]

    @classmethod
    def parse(cls, text: str, day: datetime) -> WorkerLog:
        """Read a ``prefect worker start`` log (times are local ``HH:MM:SS.mmm`` of ``day``)."""
        polls: list[tuple[float, float]] = []
        took: dict[str, float] = {}
        started: float | None = None
        for line in text.splitlines():
            match = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \|", line)
            if not match:
                continue
            h, m, sec = int(match[1]), int(match[2]), float(match[3])
            at = day.replace(hour=h, minute=m, second=0, microsecond=0).timestamp() + sec
            if "Querying for flow runs" in line:
                started = at
            elif "scheduled_flow_runs" in line and "Discovered" in line and started is not None:
                polls.append((started, at))
                started = None
            elif (run := re.search(r"submitting flow run '([0-9a-f-]+)'", line)) is not None:
                took.setdefault(run[1], at)
        return cls(polls, took)

    def poll_before(self, at: float) -> tuple[float, float] | None:
        """The last poll that ended by ``at``."""
        return max((p for p in self.polls if p[1] <= at), default=None)


def explained_by_concurrent_polls(
    inversions: Sequence[tuple[str, str]], runs: Sequence[ObservedRun], logs: Sequence[WorkerLog]
) -> list[tuple[str, str]]:
    """The inversions whose lower run was taken by a poll that overlapped another worker's poll."""
    by_job = {r.job_id: r for r in runs}
    explained = []
    for low, high in inversions:
        run_id = by_job[low].flow_run_id
        for taker in logs:
            if run_id not in taker.took:
                continue
            poll = taker.poll_before(taker.took[run_id])
            others = [p for log in logs if log is not taker for p in log.polls]
            if poll and any(s <= poll[1] and poll[0] <= e for s, e in others):
                explained.append((low, high))
    return explained


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of [start, end) intervals that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, step in events:  # ends (-1) sort before starts (+1) at the same instant
        current += step
        peak = max(peak, current)
    return peak


def rate_excess(times: Sequence[float], burst: int, rate: float) -> float:
    """The most submissions any window held beyond ``burst + rate * window``; <= 0 when the rate
    limit held (1 slot of tolerance is the caller's)."""
    ordered = sorted(times)
    worst = -math.inf
    for i, start in enumerate(ordered):
        for j in range(i, len(ordered)):
            worst = max(worst, (j - i + 1) - (burst + rate * (ordered[j] - start)))
    return worst


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class ScenarioResult:
    """What :func:`run_scenario` saw; :meth:`summary` is the benchmark's JSON line."""

    config: ScenarioConfig
    setup_runs: list[subprocess.CompletedProcess[str]]
    runs: list[ObservedRun]
    queue_limits: dict[str, int | None]
    submit_seconds: float
    slots_left: int  # irefine-running-jobs slots still held at the end
    evaluation_slots: tuple[bool, int]  # irefine-evaluations: were slots taken; slots held at the end
    worker_logs: list[WorkerLog] = field(default_factory=list)

    @property
    def inversions(self) -> list[tuple[str, str]]:
        """Every priority inversion (module docstring), whatever its cause."""
        return priority_inversions(self.runs, self.queue_limits, self.config.grace_seconds, self.chosen_at)

    @property
    def chosen_at(self) -> dict[str, float]:
        """When the server chose each run: the start of the poll of the worker that took it."""
        chosen = {}
        for run in self.runs:
            for log in self.worker_logs:
                poll = log.poll_before(log.took[run.flow_run_id]) if run.flow_run_id in log.took else None
                if poll is not None:
                    chosen[run.job_id] = min(chosen.get(run.job_id, math.inf), poll[0])
        return chosen

    @property
    def race_inversions(self) -> list[tuple[str, str]]:
        """The inversions that two workers polling at once explain (Prefect's race, see above)."""
        return explained_by_concurrent_polls(self.inversions, self.runs, self.worker_logs)

    @property
    def overlapping_polls(self) -> int:
        """Pairs of polls of different workers that overlapped in time (turns allow none)."""
        return sum(
            1
            for i, log in enumerate(self.worker_logs)
            for other in self.worker_logs[i + 1 :]
            for start, end in log.polls
            for other_start, other_end in other.polls
            if start <= other_end and other_start <= end
        )

    @property
    def max_running(self) -> int:
        return max_overlap(
            [
                (r.job_started, r.job_ended)
                for r in self.runs
                if r.job_started is not None and r.job_ended is not None
            ]
        )

    @property
    def max_running_flow_runs(self) -> int:
        return max_overlap(
            [(r.started, r.ended) for r in self.runs if r.started is not None and r.ended is not None]
        )

    @property
    def rate_excess(self) -> float:
        return rate_excess(
            [r.created for r in self.runs], SETUP_SUBMISSION_BURST, self.config.submission_rate
        )

    def summary(self) -> dict[str, Any]:
        completed = sum(r.completed for r in self.runs)
        waits: dict[str, list[float]] = {q: [] for q in PRIORITY}
        for r in self.runs:
            if r.started is not None:
                waits[r.queue].append(r.started - r.created)
        return {
            "bench": "queues",
            "submitted": len(self.runs),
            "completed": completed,
            "lost": len(self.runs) - completed,
            "priority_inversions": len(self.inversions),
            "inversions_concurrent_polls": len(self.race_inversions),
            "overlapping_polls": self.overlapping_polls,
            "max_running": self.max_running,
            "limit": self.config.job_limit,
            "p95_wait_s_by_queue": {q: round(v, 2) for q, w in waits.items() if (v := p95(w)) is not None},
            "max_running_flow_runs": self.max_running_flow_runs,
            "rate_excess": round(self.rate_excess, 2),
            "submit_s": round(self.submit_seconds, 2),
            "rate_limited_submissions": sum(r.rate_limit_wait > 0 for r in self.runs),
            "workers": f"{self.config.workers}x--limit {self.config.worker_limit}",
        }


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


async def _submit_all(config: ScenarioConfig) -> tuple[list[Submission], float]:
    """Submit every job at once, as many users would: the rate limit lets the burst through and
    makes the others wait for slots to decay free."""
    from prefect import get_client

    from engine.core import JobSpec
    from irefine.submit import submit_job

    started = time.monotonic()
    async with get_client() as client:
        submitted = await asyncio.gather(
            *(
                submit_job(
                    client,
                    JobSpec.parse({**JOB_SPEC, "seed": i}),
                    job_id=f"q{i:02d}-{queue}",
                    urgency=queue,  # type: ignore[arg-type]  # a key of PRIORITY
                    flow_parameters={"executor": "local"},
                )
                for i, queue in enumerate(submission_order(config.mix, config.seed))
            )
        )
    for done in submitted:
        if done.queue != done.job_id.split("-")[1]:
            raise AssertionError(f"job {done.job_id} was routed to {done.queue}")
    return list(submitted), time.monotonic() - started


async def _wait_until_ended(flow_run_ids: list[str], timeout: float) -> None:
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids]))
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline:
            runs = await client.read_flow_runs(flow_run_filter=ids, limit=len(flow_run_ids))
            if len(runs) == len(flow_run_ids) and all(r.state and r.state.is_final() for r in runs):
                return
            await asyncio.sleep(2)


def _state_writes(prefect_database_url: str, flow_run_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Per flow run, when the server wrote its first Pending state and its final state (epoch
    seconds; each is NaN if absent), from the Prefect database's ``flow_run_state`` rows.

    A state's ``timestamp`` is when the server received it; its row is written after the
    orchestration rules ran, shortly before the commit that the next worker poll's query sees.
    A run whose Completed state was received just before a poll started could still be Running
    for that query (seen: 47 ms apart on a loaded machine).
    """
    from sqlalchemy import create_engine, text

    engine = create_engine(prefect_database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT flow_run_id::text, type, created FROM flow_run_state "
                    "WHERE flow_run_id::text = ANY(:ids)"
                ),
                {"ids": flow_run_ids},
            ).all()
    finally:
        engine.dispose()
    writes: dict[str, tuple[float, float]] = {}
    for run_id in flow_run_ids:
        own = [(str(kind), created.timestamp()) for rid, kind, created in rows if rid == run_id]
        pending = min((at for kind, at in own if kind.endswith("PENDING")), default=math.nan)
        final = max(
            (at for kind, at in own if kind.rsplit(".", 1)[-1] in _FINAL_STATE_TYPES), default=math.nan
        )
        writes[run_id] = (pending, final)
    return writes


_FINAL_STATE_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


async def _observe(
    submitted: list[Submission], database_url: str, prefect_database_url: str | None = None
) -> tuple[list[ObservedRun], dict[str, int | None], int, tuple[bool, int]]:
    from uuid import UUID

    from prefect import get_client

    from deployments.setup import EVALUATIONS_LIMIT, RUNNING_JOBS_LIMIT
    from engine.core import JobNotFoundError
    from engine.store import JobStore

    store = JobStore(database_url)
    observed = []
    writes = (
        _state_writes(prefect_database_url, [s.flow_run_id for s in submitted])
        if prefect_database_url
        else {}
    )
    try:
        async with get_client() as client:
            queues = await client.read_work_queues(work_pool_name="irefine-local")
            limits = {q.name: q.concurrency_limit for q in queues if q.name in PRIORITY}
            slots_left = (await client.read_global_concurrency_limit_by_name(RUNNING_JOBS_LIMIT)).active_slots
            evaluations = await client.read_global_concurrency_limit_by_name(EVALUATIONS_LIMIT)
            # Its row changes only when slots are taken or given back (setup made it, once).
            moved = evaluations.updated is not None and evaluations.created is not None
            moved = moved and (evaluations.updated - evaluations.created).total_seconds() > 1
            evaluation_slots = (moved, evaluations.active_slots)
            for submission in submitted:
                job_id, run_id, queue = submission.job_id, submission.flow_run_id, submission.queue
                run = await client.read_flow_run(UUID(run_id))
                states = await client.read_flow_run_states(UUID(run_id))
                taken = _epoch(min((s.timestamp for s in states if s.type.value == "PENDING"), default=None))
                ended = _epoch(run.end_time)
                if run_id in writes:
                    taken, ended = (_nan_to_none(at) for at in writes[run_id])
                try:
                    job = store.get_job(job_id, fresh=True)
                except JobNotFoundError:
                    job = None
                observed.append(
                    ObservedRun(
                        job_id=job_id,
                        flow_run_id=run_id,
                        queue=queue,
                        created=run.created.timestamp() if run.created else math.nan,
                        taken=taken,
                        started=_epoch(run.start_time),
                        ended=ended,
                        state=run.state_name or "",
                        job_status=job.status.value if job else None,
                        job_started=_epoch(job.created_at) if job else None,
                        job_ended=_epoch(job.updated_at) if job else None,
                        rate_limit_wait=submission.rate_limit_wait_seconds,
                    )
                )
    finally:
        store.close()
    return observed, limits, slots_left, evaluation_slots


def run_scenario(
    api_url: str,
    database_url: str,
    workdir: Path,
    config: ScenarioConfig | None = None,
    log: Callable[[str], None] = lambda line: None,
    prefect_database_url: str | None = None,
) -> ScenarioResult:
    """Run the scenario against the server at ``api_url``; jobs share the store at ``database_url``.

    Given the server's own database, ``prefect_database_url``, the runs' Pending and final times
    are when the server wrote those states (:func:`_state_writes`), else when it received them.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = config or ScenarioConfig()
    limits = ["--job-limit", str(config.job_limit), "--submission-rate", str(config.submission_rate)]
    # (irefine setup's burst of irefine-submissions is SETUP_SUBMISSION_BURST)
    setup_runs = [irefine(api_url, "setup", *limits) for _ in range(2)]
    for done in setup_runs:
        if done.returncode != 0:
            raise RuntimeError(f"irefine setup failed: {done.stderr[-2000:]}")
    log("setup done twice; deploying refine")
    deploy(api_url, "refine")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        log(f"submitting {config.jobs} jobs")
        submitted, submit_seconds = asyncio.run(_submit_all(config))
        log(f"submitted in {submit_seconds:.1f} s; starting {config.workers} `irefine worker`s")
        env = {
            "IRE_DATABASE_URL": database_url,
            "IRE_HOME": str(workdir / "ire-home"),
            "PREFECT_HOME": str(workdir / "prefect-home"),  # result storage of describe-problem
            # The workers' polls (with --log-level DEBUG), for WorkerLog.
            "PREFECT_LOGGING_LOGGERS_PREFECT_WORKERS_LEVEL": "DEBUG",
        }
        workers = [
            ProcessWorker(
                api_url,
                "irefine-local",
                limit=config.worker_limit,
                log_path=workdir / f"worker-{n}.log",
                env=env,
                poll_seconds=config.poll_seconds,
                name=f"scenario-worker-{n}",
                log_level="DEBUG",
            )
            for n in range(config.workers)
        ]
        try:
            asyncio.run(_wait_until_ended([s.flow_run_id for s in submitted], config.timeout_seconds))
        finally:
            for worker in workers:
                worker.stop()
        log("all flow runs ended (or timed out); reading states and jobs")
        observed, queue_limits, slots_left, evaluation_slots = asyncio.run(
            _observe(submitted, database_url, prefect_database_url)
        )
        drain_prefect()  # this process's events (rate-limit slots) while the server is up
    today = datetime.now().astimezone()
    logs = [WorkerLog.parse(w.log_path.read_text(errors="replace"), today) for w in workers]
    return ScenarioResult(
        config, setup_runs, observed, queue_limits, submit_seconds, slots_left, evaluation_slots, logs
    )
