"""The global concurrency limits a deployment run of ``refine`` holds slots of.

``irefine setup`` (``deployments/setup.py``) creates them under these names; the flow owns the
names, so the installer depends on the flow and never the reverse.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from uuid import UUID

from engine.core import SpecError
from engine.pipeline import EvaluationSlots

RUNNING_JOBS_LIMIT = "irefine-running-jobs"
EVALUATIONS_LIMIT = "irefine-evaluations"

JOB_SLOT_LEASE_SECONDS = 60.0
"""A killed flow process frees its running-jobs slot after at most this long (the lease is renewed
while the job runs); Prefect's default of 300 s would hold back the resumed run that long."""

SLOT_RETRY_SECONDS = 60.0
"""How long taking a slot retries the server's transient errors: a 5xx while its database restarts
or fails over, or while Redis (the lease storage) is down, must not fail the run."""

_log = logging.getLogger(__name__)
released_slot_failures = 0
"""Slot releases that failed at first (counted; each is retried by :class:`_LateReleases`)."""


class _LateReleases:
    """Releases the leases whose release failed (the API or Redis, the lease storage, was down),
    on a daemon thread, retrying until the server takes them or the lease would have lapsed anyway.

    Without it a slot released during an outage stays taken until its lease lapses, and every job
    waiting for a slot of that limit waits that long after the outage ends.
    """

    def __init__(self) -> None:
        self._pending: queue.Queue[tuple[UUID, float, contextvars.Context]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, lease_ids: list[UUID]) -> None:
        if not lease_ids:
            return
        deadline = time.monotonic() + JOB_SLOT_LEASE_SECONDS
        context = contextvars.copy_context()  # the caller's Prefect settings (its API) and client
        for lease_id in lease_ids:
            self._pending.put((lease_id, deadline, context))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="irefine-late-releases", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        from prefect.exceptions import ObjectNotFound

        delays = _retry_delays()
        while True:
            lease_id, deadline, context = self._pending.get()
            try:
                context.copy().run(_release, lease_id)
            except ObjectNotFound:
                pass  # the server revoked it already (it lapsed)
            except Exception as exc:
                delay = next(delays)
                if _is_transient(exc) and time.monotonic() + delay < deadline:
                    self._pending.put((lease_id, deadline, context))
                    time.sleep(delay)
                    continue
                _log.warning(
                    "releasing concurrency lease %s failed (%s); it lapses on the server", lease_id, exc
                )
            else:
                _log.info("released concurrency lease %s after an outage", lease_id)
            delays = _retry_delays()


def _retry_delays() -> Iterator[float]:
    """Seconds to wait before each retry of a slot call: 0.5, 1, 2, 4, then 5 s."""
    delay = 0.5
    while True:
        yield delay
        delay = min(delay * 2, 5.0)


def _release(lease_id: UUID) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id=lease_id)


late_releases = _LateReleases()


def _is_transient(exc: BaseException) -> bool:
    """A server error (5xx) or a broken connection somewhere in ``exc``'s causes."""
    import httpx

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx.HTTPStatusError) and seen.response.status_code >= 500:
            return True
        if isinstance(seen, httpx.TransportError):
            return True
        seen = seen.__cause__ or seen.__context__
    # Prefect may wrap the response's status into the message only ("...: 500 Internal Server Error").
    return re.search(r": 5\d\d [A-Z]", str(exc)) is not None


@contextlib.contextmanager
def _held_slots(name: str, occupy: int = 1) -> Iterator[None]:
    """Hold ``occupy`` slots of the global limit ``name`` (strict, leased, renewal failures
    tolerated). Taking them retries transient server errors for :data:`SLOT_RETRY_SECONDS`; a
    failed release is logged and counted, not raised (the run's work is done), and handed to
    :data:`late_releases`, which releases it once the server is back."""
    global released_slot_failures
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.context import ConcurrencyContext
    from prefect.concurrency.sync import concurrency

    # Prefect records each lease granted inside this context and forgets it once released: what
    # is left after a failed release is the lease to release later.
    leases = ConcurrencyContext()
    with leases:
        deadline = time.monotonic() + SLOT_RETRY_SECONDS
        delays = _retry_delays()
        while True:
            holder = concurrency(
                name,
                occupy=occupy,
                strict=True,
                lease_duration=JOB_SLOT_LEASE_SECONDS,
                # A failed renewal (an API hiccup) must not kill a running job.
                raise_on_lease_renewal_failure=False,
            )
            try:
                holder.__enter__()
                break
            except ConcurrencySlotAcquisitionError as exc:
                delay = next(delays)
                if not _is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                _log.warning("taking a slot of %s: %s; retrying in %.1f s", name, exc, delay)
                time.sleep(delay)
        try:
            yield
        except BaseException as exc:
            holder.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            try:
                holder.__exit__(None, None, None)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                released_slot_failures += 1
                _log.warning("releasing the slot of %s failed (%s); retrying in the background", name, exc)
        finally:
            late_releases.add(list(leases.cleanup_lease_ids))
            leases.cleanup_lease_ids.clear()


@contextlib.contextmanager
def running_job_slot(deployed: bool) -> Iterator[None]:
    """In a deployment run, hold a slot of the global limit ``irefine-running-jobs`` for the job.

    The work pool's concurrency limit (``irefine setup`` sets it to the same number) is what makes
    the server hand runs out in queue-priority order, but it is checked only when a worker polls:
    two workers polling at once can claim one run too many, and other pools share the budget.
    This slot is the hard cap; a run beyond it waits here. ``strict``: a missing limit fails the
    run instead of running unlimited. In-process runs (``irefine run``) have no deployment and
    take no slot.
    """
    if not deployed:
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_held_slots(RUNNING_JOBS_LIMIT))
        except ConcurrencySlotAcquisitionError as exc:
            raise SpecError(f"{exc}: run `irefine setup` against this Prefect server") from None
        yield


def evaluation_slots(deployed: bool) -> EvaluationSlots | None:
    """In a deployment run, the slots of the global limit ``irefine-evaluations`` an evaluate
    stage holds: one per shard it fans out (at most the whole limit), so all jobs together keep at
    most that many shards in flight. ``strict``: a missing limit fails the run. In-process runs
    (``irefine run``) take none (None).
    """
    if not deployed:
        return None
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(EVALUATIONS_LIMIT).limit
        except ObjectNotFound:
            raise SpecError(f"no global limit {EVALUATIONS_LIMIT!r}: run `irefine setup`") from None

    def hold(shards: int) -> AbstractContextManager[None]:
        return _held_slots(EVALUATIONS_LIMIT, occupy=max(1, min(limit, shards)))

    return hold
