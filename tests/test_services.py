"""The composition root: a job's services from the settings or from saved blocks, one set of
defaults, and a deployment run whose store and cache come from a block set."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from blocks import DaskClusterBlock, InferenceCacheBlock, JobStoreBlock
from engine.cache import CacheConfig, EmbeddedCache, key_prefix, open_cache
from engine.core import JobSpec
from engine.execution import InProcessExecutor
from engine.execution.dask import worker_memory_limit
from engine.runner import create_job, open_job
from engine.services import services_from_settings
from engine.settings import Settings, load_settings
from engine.store import JobRecord, JobStatus, JobStore
from tests.test_run_logs import _cleanup, _deployment_run

ROOT = Path(__file__).resolve().parent.parent
SPEC = {
    "problem": "sphere",
    "problem_params": {"dim": 2},
    "strategy": "random",
    "batch_size": 4,
    "max_cycles": 2,
    "seed": 3,
    "cache": "on",  # sphere is sub-ms: 'auto' would skip the cache
}


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def test_settings_blocks_and_cache_share_one_set_of_defaults() -> None:
    settings, block = Settings.model_fields, InferenceCacheBlock.model_fields
    for setting, field in (
        ("cache_max_entries", "max_entries"),
        ("cache_namespace", "namespace"),
        ("cache_ttl_seconds", "ttl_seconds"),
        ("cache_manage_server", "manage_server"),
    ):
        assert settings[setting].default == block[field].default == getattr(CacheConfig, field), setting
    max_entries = settings["cache_max_entries"].default
    assert _default(open_cache, "max_entries") == _default(EmbeddedCache, "max_entries") == max_entries


def test_the_dask_block_local_cluster_limits_worker_memory_as_the_settings_do() -> None:
    kwargs = DaskClusterBlock(kind="local", n_workers=2).local_cluster_kwargs()
    assert kwargs["memory_limit"] == worker_memory_limit(None, 2) > 0
    assert (
        DaskClusterBlock(kind="local", n_workers=1, memory_limit="1GiB").local_cluster_kwargs()[
            "memory_limit"
        ]
        == 2**30
    )


@pytest.mark.integration
def test_services_from_settings_run_a_job_on_their_store_and_cache(
    tmp_path: Path, postgres_url: str, redis_server: Any
) -> None:
    namespace = f"svc-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        home=tmp_path, database_url=postgres_url, redis_url=redis_server.url, cache_namespace=namespace
    )
    lent = InProcessExecutor()
    unstarted = services_from_settings(settings, executor=lent)
    services = unstarted.start()
    try:
        assert services.cache == CacheConfig.from_settings(settings)
        job = create_job(services.store, JobSpec.parse(SPEC), "svc-1")
        result = services.run(job, flow_run_id="run-1")
    finally:
        services.close()
        unstarted.close()
    assert result.status is JobStatus.COMPLETED and result.progress.evaluations == 8
    with JobStore(postgres_url) as store:
        record = store.get_job("svc-1", fresh=True)
        assert record.status is JobStatus.COMPLETED and record.flow_run_id == "run-1"
        assert record.cache_misses == 8 and len(store.cycles("svc-1", fresh=True)) == 2
    keys = redis.Redis.from_url(redis_server.url).keys(key_prefix(namespace, "sphere") + "*")
    assert len(keys) == 8  # the evaluate stage wrote every computed evaluation to Redis


@pytest.mark.integration
def test_open_job_creates_resumes_or_finds_the_completed_job(sqlite_url: str) -> None:
    spec = JobSpec.parse(SPEC)
    with JobStore(sqlite_url) as store:
        new = open_job(store, spec, "open-1")
        assert not isinstance(new, JobRecord) and new.progress.cycles == 0
        again = open_job(store, spec, "open-1")  # exists, pending: resumed, not created twice
        assert not isinstance(again, JobRecord) and again.job_id == "open-1"
        store.set_status("open-1", JobStatus.COMPLETED, stop_reason="done")
        done = open_job(store, spec, "open-1")
        assert isinstance(done, JobRecord) and done.stop_reason == "done"
        with pytest.raises(Exception, match="another spec"):
            open_job(store, spec.model_copy(update={"seed": 9}), "open-1")
        with pytest.raises(Exception, match="already completed"):
            open_job(store, None, "open-1")
        with pytest.raises(Exception, match="give a job spec"):
            open_job(store, None, None)
        fresh = open_job(store, spec, None)
        assert not isinstance(fresh, JobRecord) and fresh.job_id != "open-1"


# -- a deployment run on a block set ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_deployment_run_uses_the_store_and_cache_of_its_block_set(
    prefect_api: str, ire_env: dict[str, str], postgres_url: str, redis_server: Any, tmp_path: Path
) -> None:
    from prefect import get_client

    block_set = f"services-{uuid.uuid4().hex[:8]}"
    namespace = f"blocks-{uuid.uuid4().hex[:8]}"
    JobStoreBlock(database_url=postgres_url).save(block_set)
    InferenceCacheBlock(redis_url=redis_server.url, namespace=namespace).save(block_set)
    parameters = {"spec": SPEC, "job_id": "from-blocks", "executor": "local", "services": block_set}

    async def create() -> tuple[Any, list[str]]:
        async with get_client() as client:
            return await _deployment_run(client, parameters)  # tests/test_run_logs.py

    run, limits = asyncio.run(create())
    try:
        output = tmp_path / "flow-run.log"
        with output.open("w") as sink:
            code = subprocess.run(  # as a worker runs it
                [sys.executable, "-m", "prefect", "flow-run", "execute", str(run.id)],
                env={**ire_env, "PREFECT_API_URL": prefect_api},
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=400,
            ).returncode
        assert code == 0, output.read_text()[-4000:]
        with JobStore(postgres_url) as store:  # the block's store has the job ...
            record = store.get_job("from-blocks", fresh=True)
            assert record.status is JobStatus.COMPLETED and record.evaluations == 8
            assert record.flow_run_id == str(run.id)
        with JobStore.from_settings(load_settings()) as store:  # ... the settings' store has not
            assert store.list_jobs(10) == []
        keys = redis.Redis.from_url(redis_server.url).keys(key_prefix(namespace, "sphere") + "*")
        assert len(keys) == 8  # and the block's cache holds its evaluations
        assert not (Path(ire_env["IRE_HOME"]) / "cache.sqlite").exists()
    finally:

        async def cleanup() -> None:
            async with get_client() as client:
                await _cleanup(client, run, limits)

        asyncio.run(cleanup())
        for block in (JobStoreBlock, InferenceCacheBlock):
            block.delete(block_set)


@pytest.mark.integration
def test_a_run_naming_a_missing_block_set_fails_saying_what_to_save(
    prefect_api: str, ire_env: dict[str, str]
) -> None:
    from flows.refine import refine

    state = refine(
        spec=JobSpec.parse(SPEC), job_id="no-blocks", executor="local", services="nosuch", return_state=True
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no job-store block 'nosuch'" in message and "JobStoreBlock" in message
