"""The workers' writeback: a worker killed with SIGKILL loses under 50 ms of its cheap evaluations'
time (they are buffered until they add up to that), never the expensive ones."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from engine.cache import CacheConfig, cache_key
from engine.core import fingerprint
from engine.execution import ProblemRef, Writeback
from engine.execution.base import WRITE_NOW_SECONDS, evaluate_shard

SPAWN = multiprocessing.get_context("spawn")
MS = 5.0


def candidates(n: int) -> list[dict[str, float]]:
    return [{"x": -2 + 4 * i / n, "y": 0.5} for i in range(n)]


def _evaluate(config: CacheConfig, keys: list[str], log: str, n: int) -> None:
    ref = ProblemRef("tests.problems_for_tests:Logged", {"log": log, "ms": MS})
    evaluate_shard(ref, candidates(n), Writeback(config, tuple(keys)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("redis", marks=pytest.mark.integration), "embedded"])
def test_a_killed_worker_loses_under_50_ms_of_cheap_work(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    config = CacheConfig(url, tmp_path / "home", namespace=f"wb-{tmp_path.name}")
    n, log = 2000, tmp_path / "evals.log"
    keys = [cache_key(config.namespace, "logged", "1", fingerprint(c)) for c in candidates(n)]
    worker = SPAWN.Process(target=_evaluate, args=(config, keys, str(log), n))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and len(log.read_text().splitlines()) >= 150):
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.013)
        worker.kill()  # SIGKILL: no flush at exit
        worker.join(10)
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
    evaluated = len(log.read_text().splitlines())
    assert evaluated < n, "the shard finished before the kill"
    stored = sum(ev is not None for ev in config.open().get_many(keys[:evaluated]))
    lost = evaluated - stored
    # A buffer holds under WRITE_NOW_SECONDS of evaluations; plus the one logged but not yet added.
    assert lost <= WRITE_NOW_SECONDS * 1000 / MS + 1, f"{lost} of {evaluated} evaluations lost"
