"""Fixtures for real runtimes: a Prefect server on PostgreSQL and a Dask LocalCluster, one per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.prefect_server import PrefectServer, drain_prefect


@pytest.fixture(scope="session")
def prefect_server(postgres_server) -> Iterator[PrefectServer]:
    server = PrefectServer(postgres_server.new_database())
    yield server
    server.close()


@pytest.fixture(scope="session")
def prefect_api(prefect_server: PrefectServer) -> Iterator[str]:
    """Point this process (and the subprocesses it starts) at the test Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = prefect_server.url
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url
        drain_prefect()
    if old is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = old


@pytest.fixture
def ire_env(tmp_path, monkeypatch) -> dict[str, str]:
    """An IRE_HOME of the test's own (SQLite store there), for in-process and CLI runs alike."""
    monkeypatch.setenv("IRE_HOME", str(tmp_path / "ire-home"))
    monkeypatch.delenv("IRE_DATABASE_URL", raising=False)
    monkeypatch.delenv("IRE_DASK_ADDRESS", raising=False)
    return {**os.environ, "IRE_HOME": str(tmp_path / "ire-home")}


@pytest.fixture(scope="session")
def dask_cluster():
    """A real process LocalCluster of two single-threaded workers, shared by the session."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cluster
    cluster.close()


@pytest.fixture
def dask_address(dask_cluster) -> str:
    return str(dask_cluster.scheduler_address)
