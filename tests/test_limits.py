"""Which errors taking or giving back a concurrency slot are retried (flows/limits.py): server
errors and broken connections are (a database restart or a Redis outage behind the API); a limit
that does not exist, or a refusal, is not. The retry itself is exercised by the cluster drills
(tests/test_cluster.py) against a real restart."""

from __future__ import annotations

import httpx
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

from flows.limits import _is_transient


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
