"""The Dask executor on a real LocalCluster: sharding, failures, and a worker killed mid-cycle."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from distributed import LocalCluster

from engine.core import Status
from engine.execution import InProcessExecutor, ProblemRef, split_shards
from engine.execution.dask import DaskExecutor
from engine.problems import load_problem, problem_space

pytestmark = pytest.mark.integration


def candidates(ref: ProblemRef, n: int, seed: int = 0):
    space = problem_space(load_problem(ref.name, ref.params))
    return space.decode(np.random.default_rng(seed).random((n, len(space))))


def test_split_shards_is_even_and_ordered() -> None:
    items = list(range(10))
    shards = split_shards(items, 3)  # type: ignore[arg-type]
    assert [len(s) for s in shards] == [4, 3, 3] and [x for s in shards for x in s] == items
    assert split_shards(items[:2], 8) == [[0], [1]]  # type: ignore[arg-type]


def test_dask_results_equal_in_process_including_failures(dask_address: str) -> None:
    ref = ProblemRef("tests.problems_for_tests:Flaky", {"fail_every": 4})
    cands = candidates(ref, 200)
    executor = DaskExecutor.start(dask_address)
    try:
        assert executor.workers == 2
        on_dask = executor.evaluate(ref, cands, shard_size=30)
    finally:
        executor.close()
    local = InProcessExecutor().evaluate(ref, cands)
    assert [(e.status, e.score, e.error) for e in on_dask] == [(e.status, e.score, e.error) for e in local]
    assert any(e.status is Status.FAILED for e in on_dask)


def test_vectorised_batch_equals_one_by_one(dask_address: str) -> None:
    ref = ProblemRef("rosenbrock", {"dim": 10})
    cands = candidates(ref, 1000)
    executor = DaskExecutor.start(dask_address)
    try:
        batched = executor.evaluate(ref, cands)
    finally:
        executor.close()
    problem = load_problem(ref.name, ref.params)
    assert [e.score for e in batched] == pytest.approx([problem.evaluate(c) for c in cands], rel=1e-12)


@pytest.mark.slow
def test_a_worker_killed_mid_cycle_does_not_fail_the_cycle() -> None:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    executor = DaskExecutor.start(cluster.scheduler_address)
    try:
        ref = ProblemRef("tests.problems_for_tests:WorkerPid", {})
        cands = candidates(ref, 120)  # 120 x 20 ms on 2 workers: ~1.2 s a cycle
        executor.evaluate(ref, cands[:4])  # warm up: workers have loaded the problem
        pids = sorted(executor.client.run(os.getpid).values())
        victim = pids[0]
        killer = threading.Timer(0.4, os.kill, (victim, signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        evaluations = executor.evaluate(ref, cands, shard_size=10)
        killer.join()
        assert time.monotonic() - started > 0.4, "the cycle ended before the worker was killed"
        assert len(evaluations) == 120
        assert all(e.status is Status.OK for e in evaluations)
        assert [e.score for e in evaluations] == [c["x"] for c in cands]
        # The nanny restarted the dead worker: the cluster is back to two workers.
        executor.client.wait_for_workers(2, timeout=60)
        assert victim not in executor.client.run(os.getpid).values()
    finally:
        executor.close()
        cluster.close()
