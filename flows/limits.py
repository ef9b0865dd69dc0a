"""The global concurrency limits a deployment run of ``refine`` holds slots of.

``irefine setup`` (``deployments/setup.py``) creates them under these names; the flow owns the
names, so the installer depends on the flow and never the reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

from engine.core import SpecError
from engine.pipeline import EvaluationSlots

RUNNING_JOBS_LIMIT = "irefine-running-jobs"
EVALUATIONS_LIMIT = "irefine-evaluations"

JOB_SLOT_LEASE_SECONDS = 60.0
"""A killed flow process frees its running-jobs slot after at most this long (the lease is renewed
while the job runs); Prefect's default of 300 s would hold back the resumed run that long."""


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
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                concurrency(
                    RUNNING_JOBS_LIMIT,
                    strict=True,
                    lease_duration=JOB_SLOT_LEASE_SECONDS,
                    # A failed renewal (an API hiccup) must not kill a running job.
                    raise_on_lease_renewal_failure=False,
                )
            )
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
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(EVALUATIONS_LIMIT).limit
        except ObjectNotFound:
            raise SpecError(f"no global limit {EVALUATIONS_LIMIT!r}: run `irefine setup`") from None

    def hold(shards: int) -> AbstractContextManager[None]:
        return concurrency(
            EVALUATIONS_LIMIT,
            occupy=max(1, min(limit, shards)),
            strict=True,
            lease_duration=JOB_SLOT_LEASE_SECONDS,
            raise_on_lease_renewal_failure=False,
        )

    return hold
