"""The Prefect blocks against the real things: a Prefect server on PostgreSQL, Redis, PostgreSQL, Dask."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import make_url

from blocks import DaskClusterBlock, InferenceCacheBlock, JobStoreBlock, KubernetesClusterSpec
from engine.cache import EmbeddedCache, RedisCache, cache_key
from engine.core import Evaluation, JobSpec, SpecError, TransientError
from engine.execution import ProblemRef
from engine.problems import load_problem, problem_space
from tests.services import free_port

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
SLUGS = {
    InferenceCacheBlock: "irefine-inference-cache",
    DaskClusterBlock: "irefine-dask-cluster",
    JobStoreBlock: "irefine-job-store",
}
HIDDEN = "********"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stored_data(slug: str, name: str, *, include_secrets: bool) -> dict[str, Any]:
    """The saved block document's data as the server hands it out."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name, slug, include_secrets=include_secrets)
    return dict(doc.data)


def check_evaluates(block: DaskClusterBlock) -> None:
    """The block's executor scores five sphere candidates as the problem itself does, then closes."""
    ref = ProblemRef("sphere", {"dim": 2})
    problem = load_problem(ref.name, ref.params)
    candidates = problem_space(problem).decode(np.random.default_rng(3).random((5, 2)))
    executor = block.get_executor()
    try:
        evaluations = executor.evaluate(ref, candidates)
    finally:
        executor.close()
    assert [e.score for e in evaluations] == pytest.approx([problem.evaluate(c) for c in candidates])


# -- registration ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_block_register_cli_creates_the_three_block_types(prefect_api: str) -> None:
    from prefect import get_client

    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registered 3 blocks" in " ".join(proc.stdout.split())
    with get_client(sync_client=True) as client:
        for cls, slug in SLUGS.items():
            assert cls.get_block_type_slug() == slug
            block_type = client.read_block_type_by_slug(slug)
            assert block_type.name == cls.get_block_type_name()
            schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
            assert schema is not None
            assert set(schema.fields["properties"]) == set(cls.model_fields)
            secret_fields = set(schema.fields.get("secret_fields", []))
            expected = {name for name, f in cls.model_fields.items() if "SecretStr" in str(f.annotation)}
            assert secret_fields == expected


# -- the inference cache --------------------------------------------------------------------------


def test_cache_block_round_trip_keeps_the_url_secret_and_opens_redis(
    prefect_api: str, redis_server: Any, tmp_path: Path
) -> None:
    name = unique("cache")
    InferenceCacheBlock(redis_url=redis_server.url, namespace="blocks-test", ttl_seconds=60).save(
        name, overwrite=True
    )
    slug = SLUGS[InferenceCacheBlock]
    assert stored_data(slug, name, include_secrets=False)["redis_url"] == HIDDEN
    assert stored_data(slug, name, include_secrets=True)["redis_url"] == redis_server.url

    block = InferenceCacheBlock.load(name)
    assert isinstance(block.redis_url, SecretStr) and redis_server.url not in repr(block)
    config = block.config(tmp_path)
    assert (config.redis_url, config.namespace, config.ttl_seconds) == (redis_server.url, "blocks-test", 60)

    cache = block.get_client(tmp_path)
    try:
        assert isinstance(cache, RedisCache)
        key = cache_key(cache.namespace, "sphere", "1", uuid.uuid4().hex)
        cache.put_many([(key, Evaluation(1.25, metrics={"dim": 2}))])
        (hit,) = cache.get_many([key])
        assert hit is not None and hit.score == 1.25 and hit.metrics == {"dim": 2}
    finally:
        cache.close()
    InferenceCacheBlock.delete(name)


def test_cache_block_without_redis_opens_the_embedded_cache_in_ire_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRE_HOME", str(tmp_path / "home"))
    block = InferenceCacheBlock(max_entries=10)
    assert block.config().home == tmp_path / "home"
    cache = block.get_client()
    try:
        assert isinstance(cache, EmbeddedCache)
        key = cache_key(cache.namespace, "sphere", "1", "f" * 32)
        cache.put_many([(key, Evaluation(3.0))])
        assert [e.score if e else None for e in cache.get_many([key])] == [3.0]
    finally:
        cache.close()
    assert (tmp_path / "home" / "cache.sqlite").exists()


def test_cache_block_rejects_bad_settings() -> None:
    with pytest.raises(ValidationError, match="ttl_seconds"):
        InferenceCacheBlock(ttl_seconds=0)
    with pytest.raises(ValidationError, match="namespace"):
        InferenceCacheBlock(namespace="")


# -- the job store --------------------------------------------------------------------------------


def test_job_store_block_round_trip_keeps_urls_secret_and_opens_the_store(
    prefect_api: str, postgres_url: str
) -> None:
    # The test server trusts every local connection, so a password in the URL is accepted and
    # lets us check that it never shows.
    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    name = unique("store")
    JobStoreBlock(database_url=url, replica_url=url).save(name, overwrite=True)
    slug = SLUGS[JobStoreBlock]
    hidden = stored_data(slug, name, include_secrets=False)
    assert (hidden["database_url"], hidden["replica_url"]) == (HIDDEN, HIDDEN)

    block = JobStoreBlock.load(name)
    assert block.database_url.get_secret_value() == url and block.replica_url is not None
    assert "s3cret-pw" not in repr(block)
    spec = JobSpec(problem="sphere", batch_size=4, max_evaluations=20)
    with block.get_store() as store:
        assert "s3cret-pw" not in store.url
        store.create_job("block-job", spec)
        assert store.get_job("block-job", fresh=True).spec == spec
        assert store.get_job("block-job").spec == spec  # through the replica
    JobStoreBlock.delete(name)


def test_job_store_block_needs_a_database_url() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        JobStoreBlock()  # type: ignore[call-arg]


def test_job_store_block_with_a_bad_url_raises_a_spec_error() -> None:
    with pytest.raises(SpecError, match="unsupported database 'mysql'"):
        JobStoreBlock(database_url="mysql://u@h/db").get_store()


# -- the Dask cluster -----------------------------------------------------------------------------


def test_dask_block_round_trip_and_address_executor(prefect_api: str, dask_address: str) -> None:
    name = unique("dask")
    DaskClusterBlock(kind="address", address=dask_address).save(name, overwrite=True)
    block = DaskClusterBlock.load(name)
    assert (block.kind, block.address) == ("address", dask_address)
    check_evaluates(block)
    check_evaluates(block)  # closing the executor left the shared scheduler running
    DaskClusterBlock.delete(name)


def test_dask_block_round_trip_keeps_the_kubernetes_spec(prefect_api: str) -> None:
    spec = KubernetesClusterSpec(image="registry/irefine:1", namespace="ire", cpu_request="500m")
    saved = DaskClusterBlock(kind="kubernetes", kubernetes=spec, adapt_minimum=1, adapt_maximum=8)
    name = unique("dask-k8s")
    saved.save(name, overwrite=True)
    loaded = DaskClusterBlock.load(name)
    assert loaded.kubernetes == spec and (loaded.adapt_minimum, loaded.adapt_maximum) == (1, 8)
    DaskClusterBlock.delete(name)


def test_dask_block_unreachable_address_raises_a_transient_error() -> None:
    # distributed's defaults must be loaded before dask.config.set: leaving the block deletes the
    # keys it found missing, and it would delete the whole 'distributed' section for later tests.
    import distributed  # noqa: F401

    block = DaskClusterBlock(kind="address", address=f"tcp://127.0.0.1:{free_port()}")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(TransientError, match="cannot reach the Dask scheduler"),
    ):
        block.get_executor()


@pytest.mark.slow
def test_dask_block_local_adaptive_cluster_starts_evaluates_and_closes() -> None:
    from distributed.core import Status

    block = DaskClusterBlock(kind="local", adapt_minimum=1, adapt_maximum=2)
    assert block.adaptive and block.local_cluster_kwargs()["n_workers"] == 1
    executor = block.get_executor()
    cluster = executor.client.cluster
    try:
        assert 1 <= len(executor.client.nthreads()) <= 2
        assert getattr(cluster, "_adaptive", None) is not None  # adapt() was applied
        ref = ProblemRef("sphere", {"dim": 2})
        problem = load_problem(ref.name, ref.params)
        candidates = problem_space(problem).decode(np.random.default_rng(5).random((5, 2)))
        scores = [e.score for e in executor.evaluate(ref, candidates)]
        assert scores == pytest.approx([problem.evaluate(c) for c in candidates])
    finally:
        executor.close()
    assert cluster.status is Status.closed


def test_dask_block_kubernetes_without_dask_kubernetes_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import fail as if the package were absent, installed or not.
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    block = DaskClusterBlock(kind="kubernetes", kubernetes={"image": "registry/irefine:1"})
    with pytest.raises(SpecError, match=r"pip install dask-kubernetes") as info:
        block.get_executor()
    assert "\n" not in str(info.value)


def test_dask_block_kubernetes_cluster_spec() -> None:
    # tests/test_aks_dask.py validates the whole spec against the operator's CRD.
    block = DaskClusterBlock(
        kind="kubernetes",
        kubernetes=KubernetesClusterSpec(
            image="registry/irefine:1", namespace="ire", memory_request="2Gi", memory_limit="4Gi"
        ),
        threads_per_worker=2,
        memory_limit="3GiB",
        adapt_minimum=2,
        adapt_maximum=10,
    )
    spec = block.kubernetes_cluster_spec()
    assert spec["metadata"]["name"].startswith("irefine-") and spec["metadata"]["namespace"] == "ire"
    (worker,) = spec["spec"]["worker"]["spec"]["containers"]
    assert worker["image"] == "registry/irefine:1"
    assert worker["resources"] == {"requests": {"memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert worker["args"][:6] == ["dask", "worker", "--nthreads", "2", "--memory-limit", "3GiB"]
    assert spec["spec"]["worker"]["replicas"] == 2
    assert KubernetesClusterSpec(image="x").resources() is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "address"}, "kind 'address' needs address"),
        ({"kind": "address", "address": "tcp://h:8786", "n_workers": 2}, "unset n_workers"),
        (
            {"kind": "address", "address": "tcp://h:8786", "adapt_minimum": 1, "adapt_maximum": 2},
            "unset adapt_minimum, adapt_maximum",
        ),
        ({"kind": "local", "address": "tcp://h:8786"}, "address is only for kind 'address'"),
        ({"kind": "local", "kubernetes": {"image": "x"}}, "kubernetes is only for kind 'kubernetes'"),
        ({"kind": "kubernetes"}, "kind 'kubernetes' needs kubernetes"),
        ({"kind": "local", "adapt_minimum": 1}, "set both adapt_minimum and adapt_maximum"),
        ({"kind": "local", "adapt_minimum": 3, "adapt_maximum": 2}, r"adapt_minimum \(3\) exceeds"),
        ({"kind": "local", "n_workers": 5, "adapt_minimum": 1, "adapt_maximum": 2}, "must lie within"),
        ({"kind": "local", "threads_per_worker": 0}, "threads_per_worker"),
        (
            {"kind": "kubernetes", "kubernetes": {"image": "x", "cpu_limit": "lots"}},
            "not a Kubernetes quantity",
        ),
        ({"kind": "kubernetes", "kubernetes": {"image": "x", "cpus": "1"}}, "cpus"),
        ({"kind": "remote"}, "kind"),
    ],
)
def test_dask_block_rejects_invalid_combinations(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DaskClusterBlock(**settings)
