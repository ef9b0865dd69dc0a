"""Workers whose polls of a work pool take turns, so the pool's runs go out in queue-priority order.

Prefect's server picks the runs for a worker's poll in one query (``get_scheduled_flow_runs_for_work_pool``:
queue priority first, within the pool's and queues' free slots) and locks the rows it considers
with ``FOR UPDATE SKIP LOCKED``, more rows than it returns. A second worker polling the same pool at
that moment skips the locked rows and is handed lower-priority runs, and both queries count the same
free pool slots, so together they take more runs than the pool's limit. Until a worker has moved
the runs it was given to Pending, the next query still sees them Scheduled and the slots free.

:class:`PollTurns` closes that window: a worker holds the one slot of the global concurrency limit
``irefine-worker-poll`` (``irefine setup`` creates it) from before its query until every run the
query gave it is Pending (or refused), and only then lets the next worker poll. The slot is a lease
of :data:`POLL_LEASE_SECONDS`: a worker killed while holding it blocks the others until the server
expires the lease (within a minute or so), never for ever. A slot with no lease behind it (the
server counted it in PostgreSQL but could not store its lease because Redis was down) would block
every worker for ever: a worker refused its turn for longer than a lease can live frees the slot
(:func:`free_orphaned_poll_slot`); one whose own request for a turn failed with a server error
(it may be that slot's owner) frees it at its next refusal. Start workers with ``irefine
worker``, which uses these classes.
"""

from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import httpx
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.workers.process import ProcessWorker

from deployments.setup import WORKER_POLL_LIMIT as POLL_LIMIT

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

POLL_LEASE_SECONDS = 60.0  # the server's minimum lease; a turn lasts well under a second
POLL_WAIT_SECONDS = 30.0  # a turn not granted by then: skip this poll (a dead holder's lease lapses)
ORPHAN_AFTER_SECONDS = POLL_LEASE_SECONDS + POLL_WAIT_SECONDS  # no live lease is that old
PENDING_WAIT_SECONDS = 20.0  # Pending proposals not answered by then: end the turn anyway
_RETRY_SECONDS = 0.05  # between requests for a taken turn; a turn lasts a few API calls


class PollLimitMissing(RuntimeError):
    """The global concurrency limit ``irefine-worker-poll`` does not exist on the server."""

    def __init__(self) -> None:
        super().__init__(f"no global concurrency limit {POLL_LIMIT!r} on the server: run `irefine setup`")


async def take_poll_turn(client: PrefectClient, wait_seconds: float) -> UUID | None:
    """Wait up to ``wait_seconds`` for the poll turn; its lease id, or None when another worker kept
    it all that time. Raises :class:`PollLimitMissing` when the limit does not exist."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[POLL_LIMIT], slots=1, mode="concurrency", lease_duration=POLL_LEASE_SECONDS
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423 Locked: another worker's turn
                raise
            if time.monotonic() >= deadline:
                return None
            await anyio.sleep(_RETRY_SECONDS)
            continue
        lease = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        if not lease.limits:
            raise PollLimitMissing()
        return lease.lease_id


async def end_poll_turn(client: PrefectClient, lease_id: UUID) -> None:
    """Give the turn back. Shielded: a worker stopping mid-turn still releases it."""
    with anyio.CancelScope(shield=True):
        await client.release_concurrency_slots_with_lease(lease_id)


async def free_orphaned_poll_slot(client: PrefectClient) -> None:
    """Set the poll limit's active slots to 0: called only after the turn was refused for longer
    than any lease lives (:data:`ORPHAN_AFTER_SECONDS`), so the slot held has no lease that will
    ever release or expire it (an increment the server committed while its lease storage, Redis,
    was down). Two workers doing it at once is harmless."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    await client.update_global_concurrency_limit(POLL_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))


async def check_poll_limit(client: PrefectClient) -> None:
    """Raise :class:`PollLimitMissing` unless ``irefine setup`` created the poll limit."""
    from prefect.exceptions import ObjectNotFound

    try:
        await client.read_global_concurrency_limit_by_name(POLL_LIMIT)
    except ObjectNotFound:
        raise PollLimitMissing() from None


class PollTurns:
    """Mixin for a Prefect worker class (put it first among the bases): each poll of the pool, and
    the Pending proposals for the runs it returned, happen in the worker's turn (module docstring).

    A turn not granted within :data:`POLL_WAIT_SECONDS` skips that poll with a warning; proposals
    not answered within :data:`PENDING_WAIT_SECONDS` end the turn anyway (the next poll may then
    see those runs Scheduled; the server refuses a second Pending, so no run starts twice).
    """

    # Provided by prefect.workers.base.BaseWorker, which the concrete class also derives from.
    if TYPE_CHECKING:
        client: PrefectClient
        _logger: Any
        _submitting_flow_run_ids: set[UUID]

    poll_wait_seconds: float = POLL_WAIT_SECONDS
    pending_wait_seconds: float = PENDING_WAIT_SECONDS
    orphan_after_seconds: float = ORPHAN_AFTER_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_answered: set[UUID] = set()
        self._refused_since: float | None = None  # monotonic time of the first refused turn in a row
        # Our last request for a turn failed with a server error: the server may have counted
        # the slot and lost its lease (Redis down), leaving an orphan only we can know is ours.
        self._may_own_orphan = False

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        # Answers of runs no longer being submitted are not needed any more.
        self._pending_answered &= self._submitting_flow_run_ids
        try:
            lease_id = await take_poll_turn(self.client, self.poll_wait_seconds)
        except httpx.HTTPStatusError as exc:
            self._may_own_orphan = self._may_own_orphan or exc.response.status_code >= 500
            raise
        if lease_id is None:
            now = time.monotonic()
            self._refused_since = self._refused_since or now - self.poll_wait_seconds
            if self._may_own_orphan or now - self._refused_since > self.orphan_after_seconds:
                self._logger.warning(
                    "%r held for %.0f s%s: freeing its orphaned slot",
                    POLL_LIMIT,
                    now - self._refused_since,
                    " after our request for it failed"
                    if self._may_own_orphan
                    else ", longer than any lease lives",
                )
                await free_orphaned_poll_slot(self.client)
                self._refused_since = None
                self._may_own_orphan = False
            self._logger.warning(
                "Skipping this poll: another worker kept %r for %.0f s (a killed worker's lease"
                " lapses within %.0f s)",
                POLL_LIMIT,
                self.poll_wait_seconds,
                POLL_LEASE_SECONDS,
            )
            return []
        self._refused_since = None
        self._may_own_orphan = False
        try:
            before = set(self._submitting_flow_run_ids)
            runs: list[FlowRun] = await super().get_and_submit_flow_runs()  # type: ignore[misc]
            taken = {run.id for run in runs} - before
            with anyio.move_on_after(self.pending_wait_seconds) as waited:
                # The submissions run as tasks of the worker; each answers once its Pending
                # proposal is decided (or it gave the run up without one).
                while any(
                    run_id in self._submitting_flow_run_ids and run_id not in self._pending_answered
                    for run_id in taken
                ):
                    await anyio.sleep(0.01)
            if waited.cancelled_caught:
                self._logger.warning(
                    "Ending the poll turn before every Pending proposal was answered (%.0f s)",
                    self.pending_wait_seconds,
                )
            return runs
        finally:
            await end_poll_turn(self.client, lease_id)

    async def _propose_pending_state(self, flow_run: FlowRun) -> bool:
        try:
            return await super()._propose_pending_state(flow_run)  # type: ignore[misc,no-any-return]
        finally:
            self._pending_answered.add(flow_run.id)


# abc.ABC among the bases keeps Prefect's worker registry from taking these classes for the
# types "process" and "kubernetes" (it skips abstract-looking classes): `prefect worker start`
# in the same process still gets Prefect's own classes.
class TurnTakingProcessWorker(PollTurns, ProcessWorker, abc.ABC):
    """Prefect's process worker, polling in turns (:class:`PollTurns`)."""


def turn_taking_kubernetes_worker() -> type[Any]:
    """Prefect-kubernetes' worker, polling in turns (imported only when asked for: the package is
    needed for Kubernetes pools only)."""
    from prefect_kubernetes.worker import KubernetesWorker

    class TurnTakingKubernetesWorker(PollTurns, KubernetesWorker, abc.ABC):  # type: ignore[misc]
        """Prefect-kubernetes' worker, polling in turns (:class:`PollTurns`)."""

    return TurnTakingKubernetesWorker
