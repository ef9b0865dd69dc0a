"""Which errors taking or giving back a concurrency slot are retried (flows/limits.py): server
errors and broken connections are (a database restart or a Redis outage behind the API); a limit
that does not exist, or a refusal, is not. The retry itself is exercised by the cluster drills
(tests/test_cluster.py) against a real restart; a release that failed while the API was
unreachable is done in the background as soon as it is back (here, behind a TCP gate)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

from flows.limits import _is_transient
from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent


def _wrapped(status: int) -> ConcurrencySlotAcquisitionError:
    request = httpx.Request("POST", "http://127.0.0.1/api/v2/concurrency_limits/increment-with-lease")
    response = httpx.Response(status, request=request)
    try:
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots") from exc
    except ConcurrencySlotAcquisitionError as outer:
        return outer
    raise AssertionError("no error raised")


def test_server_errors_and_broken_connections_are_retried() -> None:
    assert _is_transient(_wrapped(500)) and _is_transient(_wrapped(503))
    assert _is_transient(httpx.ConnectError("connection refused"))
    message = "Unable to acquire concurrency slots on ['irefine-evaluations']: 500 Internal Server Error"
    assert _is_transient(ConcurrencySlotAcquisitionError(message))


def test_refusals_and_missing_limits_are_not() -> None:
    assert not _is_transient(_wrapped(423)) and not _is_transient(_wrapped(404))
    missing = "Concurrency limits ['irefine-evaluations'] must be created before acquiring slots"
    assert not _is_transient(ConcurrencySlotAcquisitionError(missing))


# -- a release that fails while the API is unreachable is done as soon as it is back -------------


class _Gate:
    """A TCP forwarder in front of the test API that can be shut (connections refused, open ones
    cut) and opened again on the same port: the API unreachable for a while, as in an outage."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        assert self._listener is not None
        # shutdown() first: close() alone leaves the socket listening while the accept thread
        # is blocked in accept() on it (Linux), and the API stays reachable.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


_JOB_SIDE = """
import sys
from flows import limits
held = limits._held_slots(sys.argv[1])
held.__enter__()
print("held", flush=True)
sys.stdin.readline()  # the gate is shut now
held.__exit__(None, None, None)
print("released", limits.released_slot_failures, flush=True)
sys.stdin.readline()  # the late release runs on a daemon thread until then
"""


@pytest.mark.integration
def test_a_release_that_failed_in_an_outage_is_done_when_the_api_is_back(prefect_api: str) -> None:
    """A job process (a fresh interpreter, its API behind the gate) holds a slot, the gate shuts,
    the job gives the slot back (that fails), the gate opens: the slot is free again within
    seconds, long before its 60-s lease would lapse on the server."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"late-release-{uuid.uuid4().hex[:8]}"
    upstream = urlsplit(prefect_api).port
    assert upstream is not None
    gate = _Gate(upstream)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{gate.port}/api", "PYTHONPATH": str(ROOT)}
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))

        def active() -> int:
            return client.read_global_concurrency_limit_by_name(name).active_slots

        job = subprocess.Popen(
            [sys.executable, "-c", _JOB_SIDE, name],
            env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert job.stdin is not None and job.stdout is not None
        try:
            assert job.stdout.readline().strip() == "held" and active() == 1
            gate.shut()  # the API is unreachable when the job gives the slot back
            job.stdin.write("go\n")
            job.stdin.flush()
            assert job.stdout.readline().split() == ["released", "1"]  # the release failed once
            assert active() == 1
            gate.open()
            deadline = time.monotonic() + 40  # the lease itself would lapse only after 60 s
            while active() != 0:
                assert time.monotonic() < deadline, "the slot was not given back after the outage"
                time.sleep(0.2)
        finally:
            job.kill()
            job.wait(30)
            client.delete_global_concurrency_limit_by_name(name)
