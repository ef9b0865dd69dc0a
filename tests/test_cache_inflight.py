"""In-flight de-duplication across processes: a candidate is computed once by the jobs sharing a
cache, and a holder killed with SIGKILL is taken over once its leases expire. Real Redis and the
embedded SQLite cache, each shared by separate processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine.cache import CacheConfig, EmbeddedCache, InferenceCache, RedisCache, cache_key
from engine.cache.inflight import evaluate_once
from engine.core import Evaluation, JobSpec
from engine.execution import InProcessExecutor
from engine.runner import create_job, run_job
from engine.store import JobStore

pytestmark = pytest.mark.slow
SPAWN = multiprocessing.get_context("spawn")
BACKENDS = [pytest.param("redis", marks=pytest.mark.integration), "embedded"]
# Long enough that a holder's renewals (every third of it) arrive on a machine loaded many times
# over; short enough that a killed holder is taken over quickly.
LEASE = 2.0


@pytest.fixture(params=BACKENDS)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> CacheConfig:
    """A cache the test's processes share: the session Redis (a namespace of the test's own) or
    one SQLite file; leases of LEASE seconds, so that a dead holder is taken over quickly."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    return CacheConfig(url, tmp_path / "home", namespace=f"inflight-{tmp_path.name}", lease_seconds=LEASE)


def open_cache(config: CacheConfig) -> InferenceCache:
    cache = config.open()
    assert isinstance(cache, (RedisCache, EmbeddedCache))
    return cache


def keys_of(config: CacheConfig, n: int) -> list[str]:
    return [cache_key(config.namespace, "p", "1", f"{i:032x}") for i in range(n)]


def score_of(key: str) -> float:
    return float(int(key.rsplit(":", 1)[1], 16))


def logged_compute(cache: InferenceCache, log: Path, seconds: float, stuck_after: int | None = None) -> Any:
    """A ``compute`` that appends each key to ``log``, takes ``seconds`` a key and writes each
    result to the cache as a worker would; with ``stuck_after`` it hangs after that many keys."""

    def compute(keys: list[str]) -> list[Evaluation]:
        out = []
        for n, key in enumerate(keys):
            if stuck_after is not None and n >= stuck_after:
                time.sleep(3600)
            time.sleep(seconds)
            with log.open("a") as fh:
                fh.write(key + "\n")
            evaluation = Evaluation(score_of(key), duration=seconds)
            cache.put_many([(key, evaluation)])
            out.append(evaluation)
        return out

    return compute


def _share(config: CacheConfig, owner: str, n: int, log: str, ready: Any, go: Any, result: str) -> None:
    cache = open_cache(config)
    keys = keys_of(config, n)
    ready.set()
    go.wait(60)
    shared = evaluate_once(
        cache,
        keys,
        logged_compute(cache, Path(log), 0.02),
        owner=owner,
        lease_seconds=LEASE,
        max_wait_seconds=60,
    )
    scores = {k: shared.get(k).score for k in keys}
    Path(result).write_text(json.dumps({"computed": len(shared.computed), "scores": scores}))


def test_processes_sharing_a_cache_compute_each_candidate_once(config: CacheConfig, tmp_path: Path) -> None:
    log, ready, go = tmp_path / "computed.log", SPAWN.Event(), SPAWN.Event()
    results = [tmp_path / f"result-{i}.json" for i in range(2)]
    child = SPAWN.Process(target=_share, args=(config, "job-0", 60, str(log), ready, go, str(results[0])))
    child.start()
    here = threading.Thread(
        target=_share, args=(config, "job-1", 60, str(log), threading.Event(), go, str(results[1]))
    )
    here.start()
    assert ready.wait(120)
    go.set()  # this process and the child start together
    here.join(120)
    child.join(120)
    assert child.exitcode == 0
    computed = Counter(log.read_text().split())
    assert len(computed) == 60 and set(computed.values()) == {1}, "a candidate was computed twice"
    reports = [json.loads(r.read_text()) for r in results]
    assert sum(r["computed"] for r in reports) == 60
    expected = {k: score_of(k) for k in keys_of(config, 60)}
    assert all(r["scores"] == expected for r in reports)


def _hold(config: CacheConfig, n: int, log: str) -> None:
    """Compute the first key, then hang holding (and renewing) the leases on the rest."""
    cache = open_cache(config)
    compute = logged_compute(cache, Path(log), 0.01, stuck_after=1)
    keys = keys_of(config, n)
    evaluate_once(cache, keys, compute, owner="holder", lease_seconds=LEASE, max_wait_seconds=60)


def wait_for_lines(path: Path, n: int, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not (path.exists() and len(path.read_text().split()) >= n):
        assert time.monotonic() < deadline, f"{path} never got {n} lines"
        time.sleep(0.02)


def test_a_killed_holder_is_taken_over_once_its_leases_expire(config: CacheConfig, tmp_path: Path) -> None:
    log, waiter_log = tmp_path / "holder.log", tmp_path / "waiter.log"
    holder = SPAWN.Process(target=_hold, args=(config, 20, str(log)))
    holder.start()
    try:
        wait_for_lines(log, 1)  # it holds the leases on all 20 and has stored the first
        cache = open_cache(config)
        outcome: dict[str, Any] = {}

        def wait() -> None:
            start = time.monotonic()
            outcome["shared"] = evaluate_once(
                cache,
                keys_of(config, 20),
                logged_compute(cache, waiter_log, 0.005),
                owner="waiter",
                lease_seconds=LEASE,
                max_wait_seconds=60,
            )
            outcome["seconds"] = time.monotonic() - start

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(1.5 * LEASE)  # the holder renews its leases, so the waiter computes nothing
        assert not waiter_log.exists(), "the waiter computed candidates whose holder is alive"
        holder.kill()  # SIGKILL: no release, no cleanup
        holder.join(10)
        killed_at = time.monotonic()
        waiter.join(30)
        assert not waiter.is_alive()
        taken_over_after = time.monotonic() - killed_at
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
    shared = outcome["shared"]
    assert sorted(shared.computed) == sorted(keys_of(config, 20)[1:])
    assert list(shared.read) == keys_of(config, 20)[:1]  # the result the holder stored is kept
    assert all(shared.get(k).score == score_of(k) for k in keys_of(config, 20))
    assert taken_over_after < LEASE + 2.0, "the takeover waited much longer than a lease"
    assert outcome["seconds"] > 1.5 * LEASE


# -- whole jobs -----------------------------------------------------------------------------------


def logged_spec(log: Path, ms: float, evaluations: int, batch: int) -> dict[str, Any]:
    return {
        "problem": "tests.problems_for_tests:Logged",
        "problem_params": {"log": str(log), "ms": ms},
        "strategy": "cmaes",
        "batch_size": batch,
        "max_evaluations": evaluations,
        "seed": 21,
    }


def _run_job(config: CacheConfig, home: str, job_id: str, spec: dict[str, Any], ready: Any, go: Any) -> None:
    store = JobStore(f"sqlite:///{home}/{job_id}.db")
    job = create_job(store, JobSpec.parse(spec), job_id)
    ready.set()
    go.wait(60)
    result = run_job(job, store, InProcessExecutor(), cache=config)
    Path(home, f"{job_id}.json").write_text(json.dumps(result.to_dict()))
    store.close()


def test_two_identical_jobs_at_once_pay_once_and_agree(config: CacheConfig, tmp_path: Path) -> None:
    log, ready, go = tmp_path / "evals.log", SPAWN.Event(), SPAWN.Event()
    spec = logged_spec(log, ms=20, evaluations=80, batch=10)
    child = SPAWN.Process(target=_run_job, args=(config, str(tmp_path), "j1", spec, ready, go))
    child.start()
    here = threading.Thread(target=_run_job, args=(config, str(tmp_path), "j2", spec, threading.Event(), go))
    here.start()
    assert ready.wait(120)
    go.set()  # both jobs start together
    here.join(180)
    child.join(180)
    assert child.exitcode == 0
    results = [json.loads((tmp_path / f"j{i}.json").read_text()) for i in (1, 2)]
    evaluated = log.read_text().splitlines()
    assert len(evaluated) == len(set(evaluated)), "both jobs computed the same candidate"
    assert sum(r["cache_misses"] for r in results) == len(evaluated) <= 80
    assert all(r["status"] == "completed" and r["evaluations"] == 80 for r in results)
    assert results[0]["best_score"] == results[1]["best_score"]


def test_a_job_killed_mid_cycle_is_taken_over_and_the_other_completes(
    config: CacheConfig, tmp_path: Path
) -> None:
    log, ready, go = tmp_path / "evals.log", SPAWN.Event(), SPAWN.Event()  # kept until the child reads them
    spec = logged_spec(log, ms=800, evaluations=12, batch=8)  # a first cycle of 6.4 s: 3 leases long
    go.set()
    first = SPAWN.Process(target=_run_job, args=(config, str(tmp_path), "killed", spec, ready, go))
    first.start()
    try:
        wait_for_lines(log, 2)  # two results stored, six leases held
        store = JobStore(f"sqlite:///{tmp_path}/survivor.db")
        job = create_job(store, JobSpec.parse(spec), "survivor")
        outcome: dict[str, Any] = {}
        survivor = threading.Thread(
            target=lambda: outcome.update(result=run_job(job, store, InProcessExecutor(), cache=config))
        )
        survivor.start()
        time.sleep(1.5 * LEASE)  # the survivor waits; the first job renews its leases
        before_kill = Counter(log.read_text().splitlines())
        assert set(before_kill.values()) == {1}, "the survivor computed a candidate being computed"
        first.kill()
        first.join(10)
        survivor.join(60)
        assert not survivor.is_alive()
    finally:
        if first.is_alive():
            first.kill()
            first.join()
    result = outcome["result"]
    assert result.status.value == "completed" and result.progress.evaluations == 12
    assert result.progress.cached >= 2  # the results the killed job stored before it died
    store.close()
