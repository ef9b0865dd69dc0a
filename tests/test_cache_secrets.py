"""The Redis password never shows: not in a repr, a log line, an exception, a Dask task's printed
arguments or the CLI's output, even when a job fails on a real Dask cluster against a real,
password-protected Redis."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import Float
from engine.cache import CacheConfig, RedisCache, process_cache, redact_url
from engine.core import JobSpec
from engine.execution import ProblemRef, Writeback
from engine.execution.dask import DaskExecutor
from engine.runner import create_job, run_job
from engine.store import JobStore
from tests.services import RedisServer

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = f"pw-{uuid.uuid4().hex}"


class BuiltOnlyOffWorkers:
    """A problem that the flow process can build but a Dask worker cannot: every task fails."""

    space = {"x": Float(0, 1)}
    version = "1"

    def __init__(self) -> None:
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:  # not on a worker
            return
        raise RuntimeError("this problem cannot be built on a Dask worker")

    def evaluate(self, candidate: Any) -> float:
        return float(candidate["x"])


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        assert PASSWORD in server.url
        yield server


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host/1?ssl_cert_reqs=required", "rediss://user:***@host/1?ssl_cert_reqs=required"),
        ("redis+sentinel://h1:26379,h2/svc?sentinel_password=s3cret", "redis+sentinel://h1:26379,h2/svc?sentinel_password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_cache_config_and_writeback_reprs_hide_the_password(tmp_path: Path) -> None:
    config = CacheConfig(f"redis://:{PASSWORD}@127.0.0.1:1/0", tmp_path)
    writeback = Writeback(config, ("k",))
    for text in (repr(config), str(config), repr(writeback), repr((ProblemRef("sphere"), [], writeback))):
        assert PASSWORD not in text and "***" in text
    assert pickle.loads(pickle.dumps(config)) == config  # the workers still get the real URL
    assert pickle.loads(pickle.dumps(config)).redis_url == config.redis_url


def _texts_of(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_job_on_dask_never_shows_the_password(
    locked_redis: RedisServer, dask_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from distributed import Client

    caplog.set_level(logging.DEBUG)
    config = CacheConfig(locked_redis.url, tmp_path / "home", namespace="secrets")
    store = JobStore(f"sqlite:///{tmp_path / 'store.db'}")
    spec = JobSpec.parse(
        {
            "problem": f"{__name__}:BuiltOnlyOffWorkers",
            "strategy": "random",
            "batch_size": 4,
            "max_evaluations": 8,
            "cache": "on",
        }
    )
    job = create_job(store, spec, "leaky")
    client = Client(dask_address, set_as_default=False)
    executor = DaskExecutor(client)
    try:
        with pytest.raises(Exception) as failure:  # whatever the engine raises for a lost cycle
            run_job(job, store, executor, cache=config)
        worker_logs = client.get_worker_logs()
        scheduler_logs = client.get_scheduler_logs()
    finally:
        client.close()
    cache = process_cache(config)
    assert isinstance(cache, RedisCache)
    stats = cache.stats()
    # At least the first batch was looked up (a strategy that asks ahead may have sent a second).
    assert stats.misses >= 4 and stats.unavailable == 0, "the cache was not reached with the password"
    worker_lines = [str(message) for logs in worker_logs.values() for _, message in logs]
    # The worker's failure reached the job as the user's own error (not retried, engine.execution).
    assert "cannot be built on a Dask worker" in str(failure.value)
    texts = [
        caplog.text,
        *_texts_of(failure.value),
        store.get_job("leaky").error or "",
        *worker_lines,
        *(str(message) for _, message in scheduler_logs),
        repr(job),
    ]
    leaks = [text for text in texts if PASSWORD in text]
    assert not leaks, leaks[0][:2000]
    store.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failing_cli_run_never_shows_the_password(
    prefect_api: str, ire_env: dict[str, str], locked_redis: RedisServer
) -> None:
    env = {
        **ire_env,
        "IRE_REDIS_URL": locked_redis.url,
        "IRE_DASK_WORKERS": "1",
        "IRE_CACHE_NAMESPACE": "cli",
    }
    env.pop("IRE_DASK_ADDRESS", None)
    command = [
        sys.executable, "-m", "irefine", "run", "--problem", "tests.problems_for_tests:Flaky",
        "--problem-param", "fail_every=1", "--strategy", "random", "--batch-size", "4",
        "--max-evaluations", "8", "--cache", "on", "--job-id", "cli-leaky",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode != 0, run.stdout + run.stderr
    status = subprocess.run(
        [sys.executable, "-m", "irefine", "status", "cli-leaky", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"failed"' in status.stdout, status.stdout + status.stderr
    output = run.stdout + run.stderr + status.stdout + status.stderr
    assert "max_failure_share" in output  # the failure is reported
    assert PASSWORD not in output, output[output.index(PASSWORD) - 500 :][:1000]
