"""A real Prefect API server for tests: `prefect server start` on PostgreSQL, on a loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from deployments.server import SERVER_SETTINGS
from irefine.server import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """`prefect server start` in a subprocess, its database on the given PostgreSQL URL."""

    def __init__(self, database_url: str, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = Path(tempfile.mkdtemp(prefix="ire-prefect-"))
        self.log_path = self.home / "server.log"
        async_url = database_url.replace("postgresql+psycopg://", "postgresql+asyncpg://")
        env = {
            **SERVER_SETTINGS,  # what we recommend for a server that runs refinement jobs
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": async_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            # The UI it serves calls this API (by default it would call port 4200).
            "PREFECT_UI_API_URL": self.url,
        }
        env.pop("PREFECT_API_URL", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"prefect server did not start within {timeout:.0f} s")

    def close(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process, 20)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def drain_prefect() -> None:
    """Send this process's buffered run logs and events while the server is still up (left for
    exit, they retry a stopped server for a minute)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


@contextlib.contextmanager
def prefect_api_on_postgres() -> Iterator[PrefectServer]:
    """A private PostgreSQL and a Prefect server on it, for scripts (the benchmarks).

    Sets PREFECT_API_URL, which must happen before prefect is first imported; on exit drains
    this process's logs and events, then stops both servers.
    """
    from tests.services import PostgresServer

    if "prefect" in sys.modules:
        raise RuntimeError("prefect was imported before its API URL was set")
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresServer())
        server = PrefectServer(postgres.new_database())
        stack.callback(server.close)
        os.environ["PREFECT_API_URL"] = server.url
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        stack.callback(drain_prefect)
        yield server
