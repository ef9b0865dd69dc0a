"""Issue 4's priority scenario on a real Prefect server (PostgreSQL) with two process workers.

18 jobs of mixed priority (30 in ``bench/queues.py``) go in through ``irefine submit``'s entry
point, all at once, before the workers start, so all of them wait at the same time; the workers
(2 x ``irefine worker --limit 6``, room for 12, polling in turns) then drain them under a job
limit of 3. Slow on a busy 2-core machine: one flow-run process a job.
The measures are defined in ``tests/queue_scenario.py`` and checked on hand-made timelines
first, so that a broken measure cannot pass.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from tests.queue_scenario import (
    PRIORITY,
    ObservedRun,
    ScenarioConfig,
    ScenarioResult,
    WorkerLog,
    explained_by_concurrent_polls,
    max_overlap,
    priority_inversions,
    rate_excess,
    run_scenario,
    submission_order,
)

LIMITS = {"critical": None, "high": 4, "normal": 2, "low": 1}
MIX = {"critical": 3, "high": 5, "normal": 5, "low": 5}
"""18 jobs: every queue, the job limit and the rate limit's burst of 10 exercised, in ~60% of the
time the 30 jobs of ``bench/queues.py`` take (that benchmark runs the full scenario)."""


def _run(job_id: str, queue: str, created: float, taken: float, ended: float) -> ObservedRun:
    return ObservedRun(
        job_id, job_id, queue, created, taken, taken + 1, ended, "Completed", "completed", taken + 1, ended
    )


def test_inversion_measure_counts_first_come_first_served() -> None:
    # low submitted first, high later; one slot: FIFO serves low first while high waits 10 s.
    fifo = [_run("low", "low", 0, 1, 11), _run("high", "high", 0.5, 11, 21)]
    assert priority_inversions(fifo, LIMITS, grace=2) == [("low", "high")]
    by_priority = [_run("low", "low", 0, 11, 21), _run("high", "high", 0.5, 1, 11)]
    assert priority_inversions(by_priority, LIMITS, grace=2) == []


def test_inversion_measure_allows_one_poll_and_a_full_queue() -> None:
    # Taken by the same poll: Pending order within the grace is not an inversion.
    same_poll = [_run("low", "low", 0, 1.0, 11), _run("high", "high", 0.5, 1.3, 11)]
    assert priority_inversions(same_poll, LIMITS, grace=2) == []
    # normal is at its limit (2 running) when low is taken: the server must skip normal.
    full = [
        _run("n1", "normal", 0, 1, 30),
        _run("n2", "normal", 0, 1, 30),
        _run("low", "low", 0, 5, 15),
        _run("n3", "normal", 0, 30, 40),
    ]
    assert priority_inversions(full, LIMITS, grace=2) == []
    # n2 ends between the poll that chose low (t=4.8) and low's Pending (t=5.2): the server saw
    # normal full. Judged at the Pending time it would look free; judged at the poll it is not.
    ends_meanwhile = [
        _run("n1", "normal", 0, 1, 30),
        _run("n2", "normal", 0, 1, 5.0),
        _run("low", "low", 0, 5.2, 15),
        _run("n3", "normal", 0, 30, 40),
    ]
    assert priority_inversions(ends_meanwhile, LIMITS, grace=2) == [("low", "n3")]
    assert priority_inversions(ends_meanwhile, LIMITS, grace=2, chosen_at={"low": 4.8}) == []
    # One poll (started at 9.9) chose n2, for normal's last free slot, and low: n3 had no room.
    # Had another poll chosen n2 after low's, normal had room when low was chosen.
    one_poll = [
        _run("n1", "normal", 0, 1, 30),
        _run("n2", "normal", 0, 10.1, 30),
        _run("low", "low", 0, 10.0, 20),
        _run("n3", "normal", 0, 30, 40),
    ]
    assert priority_inversions(one_poll, LIMITS, grace=2, chosen_at={"n2": 9.9, "low": 9.9}) == []
    assert priority_inversions(one_poll, LIMITS, grace=2, chosen_at={"n2": 9.95, "low": 9.9}) == [
        ("low", "n3")
    ]


WORKER_LOG = """\
08:10:17.100 | DEBUG   | prefect.workers.process.w0 - Querying for flow runs scheduled before 2026-11-27
08:10:17.400 | DEBUG   | prefect.workers.process.w0 - Discovered 2 scheduled_flow_runs
08:10:17.500 | INFO    | prefect.flow_runs.worker - Worker 'w0' submitting flow run '81afff81-ad31-4097-b8e5-\
a5c80230f1f2'
08:10:18.100 | DEBUG   | prefect.workers.process.w0 - Querying for flow runs scheduled before 2026-11-27
08:10:18.200 | DEBUG   | prefect.workers.process.w0 - Discovered 0 scheduled_flow_runs
"""


def test_worker_log_and_concurrent_poll_attribution() -> None:
    day = datetime(2026, 11, 27, tzinfo=UTC)
    log = WorkerLog.parse(WORKER_LOG, day)
    at = day.replace(hour=8, minute=10).timestamp()
    assert log.polls == [(at + 17.1, at + 17.4), (at + 18.1, at + 18.2)]
    assert log.took == {"81afff81-ad31-4097-b8e5-a5c80230f1f2": at + 17.5}
    low = _run("low", "low", 0, at + 17.5, at + 30)
    low = ObservedRun(**{**low.__dict__, "flow_run_id": "81afff81-ad31-4097-b8e5-a5c80230f1f2"})
    high = _run("high", "high", 0, at + 40, at + 50)
    overlapping = WorkerLog([(at + 17.3, at + 17.6)], {})
    apart = WorkerLog([(at + 16.0, at + 17.0)], {})
    assert explained_by_concurrent_polls([("low", "high")], [low, high], [log, overlapping]) == [
        ("low", "high")
    ]
    assert explained_by_concurrent_polls([("low", "high")], [low, high], [log, apart]) == []


def test_overlapping_polls_are_pairs_of_two_workers_polls() -> None:
    one = WorkerLog([(0.0, 1.0), (2.0, 3.0)], {})
    two = WorkerLog([(1.5, 1.9), (2.5, 4.0)], {})
    result = ScenarioResult(ScenarioConfig(), [], [], {}, 0.0, 0, (False, 0), [one, two])
    assert result.overlapping_polls == 1  # (2, 3) and (2.5, 4); a worker's own polls never count
    assert ScenarioResult(ScenarioConfig(), [], [], {}, 0.0, 0, (False, 0), [one]).overlapping_polls == 0


def test_overlap_and_rate_measures() -> None:
    assert max_overlap([(0, 10), (5, 15), (10, 20)]) == 2  # an end and a start at 10 do not overlap
    assert max_overlap([(0, 10), (1, 9), (2, 8), (3, 7)]) == 4
    burst_then_paced = [0.0] * 10 + [1.0 * i for i in range(1, 11)]
    assert rate_excess(burst_then_paced, burst=10, rate=1.0) <= 0
    assert rate_excess([0.1 * i for i in range(30)], burst=10, rate=1.0) > 15  # no limit at all


def test_submission_order_puts_urgent_jobs_behind_routine_ones() -> None:
    order = submission_order({"critical": 4, "high": 8, "normal": 10, "low": 8}, seed=4)
    assert len(order) == 30
    behind = sum(1 for i, a in enumerate(order) for b in order[i + 1 :] if PRIORITY[b] < PRIORITY[a])
    assert behind > 100  # first-come-first-served would invert many of these


@pytest.fixture(scope="module")
def scenario(postgres_server, tmp_path_factory) -> ScenarioResult:
    """The scenario on a Prefect server of its own: other modules' workers, queues and limits
    (paused queues, other job limits) must not mix with its measures."""
    from tests.prefect_server import PrefectServer

    prefect_database = postgres_server.new_database()
    server = PrefectServer(prefect_database)
    try:
        return run_scenario(
            server.url,
            postgres_server.new_database(),
            tmp_path_factory.mktemp("queues"),
            ScenarioConfig(mix=MIX),
            prefect_database_url=prefect_database,
        )
    finally:
        server.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_setup_twice_second_run_changes_nothing(scenario: ScenarioResult) -> None:
    first, second = scenario.setup_runs
    assert any(line.startswith("created") for line in first.stdout.splitlines())
    lines = second.stdout.splitlines()
    assert lines and all(line.startswith("unchanged") for line in lines), second.stdout


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_job_completes(scenario: ScenarioResult) -> None:
    assert len(scenario.runs) == scenario.config.jobs == sum(MIX.values())
    lost = [(r.job_id, r.state, r.job_status) for r in scenario.runs if not r.completed]
    assert lost == []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_higher_priority_queues_start_first(scenario: ScenarioResult) -> None:
    runs = scenario.runs
    first_taken = min(r.taken for r in runs if r.taken is not None)
    assert all(r.created < first_taken for r in runs)  # all of them waited at the same time
    # Every run is in a worker's log, so every inversion is judged at the poll that chose it.
    took = {run_id for log in scenario.worker_logs for run_id in log.took}
    assert took == {r.flow_run_id for r in runs}
    # All inversions count, those of two polls racing in Prefect's queue query too; the workers
    # poll in turns, so no two polls overlapped.
    assert scenario.overlapping_polls == 0
    assert scenario.inversions == [], f"of which concurrent polls explain {scenario.race_inversions}"
    # And the order is visible: every critical job was taken before any low one.
    critical = [r.taken for r in runs if r.queue == "critical" and r.taken is not None]
    low = [r.taken for r in runs if r.queue == "low" and r.taken is not None]
    assert max(critical) < min(low)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_running_jobs_never_exceed_the_limit(scenario: ScenarioResult) -> None:
    # The workers have room for 12 and all 18 jobs wait; the irefine-running-jobs slot says 3.
    assert 2 <= scenario.max_running <= scenario.config.job_limit == 3
    # The pool's limit (3) holds the flow runs too: polls in turns never both count the same free
    # slots, so no flow run waits Running for a job slot.
    assert scenario.max_running_flow_runs <= scenario.config.job_limit
    assert scenario.slots_left == 0  # every job gave its slot back
    # Each cycle's evaluate stage took irefine-evaluations slots, and gave them back.
    assert scenario.evaluation_slots == (True, 0)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submission_rate_limit_holds(scenario: ScenarioResult) -> None:
    config = scenario.config
    assert math.isfinite(scenario.rate_excess)
    assert scenario.rate_excess <= 1  # one slot of timing tolerance
    # All were submitted at once: the burst of 10 went through, the others waited for slots (two
    # of slack: slots refill while the burst is submitted).
    assert sum(r.rate_limit_wait > 0 for r in scenario.runs) >= config.jobs - 10 - 2
    assert scenario.submit_seconds >= (config.jobs - 10) / config.submission_rate - 1
