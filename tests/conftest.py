"""Shared fixtures.

Services (see ``tests/services.py``): ``redis_server`` and ``postgres_server`` start once per
session; ``postgres_url`` gives each test a fresh PostgreSQL database, ``sqlite_url`` a fresh
SQLite file. A missing service binary fails the tests that need it, loudly: CI must not pass by
skipping them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy.engine import make_url

from tests.services import PostgresServer, RedisServer, ServiceError

pytest_plugins = ["tests.runtime_fixtures"]

T = TypeVar("T", RedisServer, PostgresServer)

# -- services: Redis and PostgreSQL ----------------------------------------------------------------


def _session_service(start: Callable[[], T], what: str) -> Iterator[T]:
    """A service started once for the session and closed after it; one that cannot start fails
    the tests that need it (never a skip)."""
    try:
        server = start()
    except ServiceError as exc:
        pytest.fail(f"cannot start {what} for the tests: {exc}", pytrace=False)
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the session (``.url``, ``.stop()``, ``.start()``)."""
    yield from _session_service(RedisServer, "Redis")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for the session, or the server of IRE_TEST_POSTGRES_URL."""
    yield from _session_service(PostgresServer, "PostgreSQL")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped after the test."""
    url = postgres_server.new_database()
    yield url
    name = make_url(url).database
    if name:
        with contextlib.suppress(Exception):
            postgres_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'store.db'}"
