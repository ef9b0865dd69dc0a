"""The inference cache inside the refinement loop: warm reruns, versions, Redis outages, resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine.cache import CacheConfig, RedisCache
from engine.cache import config as cache_config_module
from engine.core import JobSpec
from engine.execution import InProcessExecutor
from engine.runner import create_job, run_job
from engine.store import JobStore


@pytest.fixture
def store(sqlite_url: str):
    s = JobStore(sqlite_url)
    yield s
    s.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run(store: JobStore, config: CacheConfig | None, job_id: str, listeners=(), **spec):
    job = create_job(store, JobSpec.parse(spec), job_id)
    return run_job(job, store, InProcessExecutor(), cache=config, listeners=listeners)


def logged_spec(log: Path, **extra) -> dict:
    return {
        "problem": "tests.problems_for_tests:Logged",
        "problem_params": {"log": str(log), "ms": 2, **extra},
        "strategy": "random",
        "batch_size": 10,
        "max_evaluations": 60,
        "seed": 4,
    }


@pytest.fixture(params=["embedded", "redis"])
def cache(request, tmp_path: Path) -> CacheConfig:
    if request.param == "embedded":
        return CacheConfig(redis_url=None, home=tmp_path / "home", namespace="t")
    server = request.getfixturevalue("redis_server")
    return CacheConfig(redis_url=server.url, home=tmp_path / "home", namespace=f"t-{tmp_path.name}")


def test_warm_rerun_evaluates_nothing(store: JobStore, cache: CacheConfig, tmp_path: Path) -> None:
    log = tmp_path / "evals.log"
    cold = run(store, cache, "cold", **logged_spec(log))
    assert len(lines(log)) == 60 and cold.progress.cache_misses == 60 and cold.progress.cached == 0
    warm = run(store, cache, "warm", **logged_spec(log))
    assert len(lines(log)) == 60, "a warm rerun evaluated again"
    assert warm.progress.cached == 60 and warm.progress.cache_misses == 0
    assert warm.progress.best_score == cold.progress.best_score
    assert store.get_job("warm").cache_misses == 0 and store.get_job("warm").cached_evaluations == 60
    # A new problem version makes every earlier entry unreachable.
    bumped = run(store, cache, "bumped", **logged_spec(log, version="2"))
    assert len(lines(log)) == 120 and bumped.progress.cached == 0


def test_cache_off_and_auto_off_for_cheap_evaluations(
    store: JobStore, cache: CacheConfig, tmp_path: Path
) -> None:
    log = tmp_path / "evals.log"
    run(store, cache, "a", **logged_spec(log), cache="off")
    run(store, cache, "b", **logged_spec(log), cache="off")
    assert len(lines(log)) == 120
    # sphere evaluates in microseconds: 'auto' stops paying for look-ups once the first cycle shows
    # it. Random search asks ahead, so the second cycle may already be looking up by then.
    spec = {"problem": "sphere", "strategy": "random", "batch_size": 50, "max_evaluations": 200}
    first = run(store, cache, "c1", **spec)
    assert first.progress.cache_misses in (50, 100)
    assert run(store, cache, "c2", **spec).progress.cached in (50, 100)  # the first cycle was cached


def test_repeats_within_a_batch_are_paid_once(store: JobStore, tmp_path: Path) -> None:
    log = tmp_path / "evals.log"
    cfg = CacheConfig(redis_url=None, home=tmp_path / "home")
    spec = {
        "problem": "tests.problems_for_tests:Logged",
        "problem_params": {"log": str(log), "ms": 1},
        "strategy": "random",
        "strategy_params": {},
        "batch_size": 10,
        "max_evaluations": 10,
    }
    # The space is continuous, so force repeats with a one-point grid through an Int-only problem.
    run(store, cfg, "grid", **{**spec, "problem": "tests.problems_for_tests:Tiny", "problem_params": {}})
    assert store.get_job("grid").cached_evaluations == 8  # 10 candidates, 2 distinct values


def test_redis_outage_mid_job_degrades_then_recovers(store: JobStore, tmp_path: Path, caplog) -> None:
    from tests.services import RedisServer

    server = RedisServer()
    cfg = CacheConfig(redis_url=server.url, home=tmp_path / "home", namespace="outage")
    # Short backoff so that the test sees the reconnection within a few cycles.
    cache_config_module._OPEN[cfg] = RedisCache(
        server.url, namespace="outage", retry_initial=0.05, retry_max=0.1
    )
    log = tmp_path / "evals.log"
    events: list[str] = []

    def chaos(job, record) -> None:
        if record.cycle == 2:
            server.stop()
            events.append("stopped")
        elif record.cycle == 5:
            server.start()
            events.append("started")

    spec = logged_spec(log) | {"max_evaluations": 120, "problem_params": {"log": str(log), "ms": 10}}
    try:
        with caplog.at_level(logging.WARNING):
            result = run(store, cfg, "outage", listeners=[chaos], **spec)
        assert events == ["stopped", "started"]
        assert result.progress.evaluations == 120 and result.progress.failed == 0
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and "redis" in r.getMessage().lower()
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        # The same job without the cache gives the same result.
        plain = run(store, None, "plain", **spec)
        assert plain.progress.best_score == result.progress.best_score
        # After the restart the cache was written again: a rerun hits on the late cycles.
        stats_before = cache_config_module._OPEN[cfg].stats()
        assert stats_before.unavailable > 0
        rerun = run(store, cfg, "rerun", **spec)
        assert rerun.progress.cached >= 40  # cycles 7-12 at least were written after the restart
    finally:
        cache_config_module._OPEN.pop(cfg).close()
        server.close()
