"""The composition root: everything one job run needs besides its spec, built in one place.

:func:`services_from_settings` opens a run's store and cache from :class:`~engine.settings.Settings`
(``blocks.services.services_from_blocks`` from saved Prefect blocks, with the same defaults) as
:class:`UnstartedServices`: the run opens its job in that store first, and only then starts its
executor (:meth:`UnstartedServices.start` -> :class:`JobServices`), so that a refused job starts no
Dask cluster. The ``refine`` flow adds its Prefect stage runner, observers and slots with
:meth:`JobServices.with_run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

from engine.cache import CacheConfig
from engine.execution import Executor, InProcessExecutor
from engine.pipeline import EvaluationSlots, StageRunner
from engine.runner import (
    CycleListener,
    Job,
    JobResult,
    ResourceReader,
    call_stage,
    run_job,
)
from engine.settings import Settings
from engine.store import JobStore

__all__ = [
    "ExecutorKind",
    "JobServices",
    "UnstartedServices",
    "open_executor",
    "services_from_settings",
]

ExecutorKind = Literal["dask", "local"]


@dataclass(frozen=True)
class JobServices:
    """The store, inference cache, executor and run hooks of one job run; :meth:`close` releases
    what was opened for it (``owned``), never what the caller lent."""

    settings: Settings
    store: JobStore
    cache: CacheConfig | None
    executor: Executor
    stages: StageRunner = call_stage
    listeners: tuple[CycleListener, ...] = ()
    evaluation_slots: EvaluationSlots | None = None
    resource_usage: ResourceReader | None = None
    owned: tuple[Callable[[], None], ...] = ()

    def with_run(
        self,
        *,
        stages: StageRunner | None = None,
        listeners: Sequence[CycleListener] = (),
        evaluation_slots: EvaluationSlots | None = None,
        resource_usage: ResourceReader | None = None,
    ) -> JobServices:
        """These services with a run's stage runner, further listeners, slots and resource reader."""
        return replace(
            self,
            stages=stages or self.stages,
            listeners=(*self.listeners, *listeners),
            evaluation_slots=evaluation_slots or self.evaluation_slots,
            resource_usage=resource_usage or self.resource_usage,
        )

    def run(self, job: Job, flow_run_id: str | None = None) -> JobResult:
        """Run ``job`` to a stop rule on these services (see :func:`engine.runner.run_job`)."""
        return run_job(
            job,
            self.store,
            self.executor,
            stages=self.stages,
            listeners=self.listeners,
            cache=self.cache,
            evaluation_slots=self.evaluation_slots,
            resource_usage=self.resource_usage,
            flow_run_id=flow_run_id,
        )

    def close(self) -> None:
        """Close what these services opened, the last opened first; the first error is raised."""
        _close_all(self.owned)


def open_executor(kind: ExecutorKind, dask_address: str | None, settings: Settings) -> Executor:
    """The executor of a run: in-process, the Dask scheduler at ``dask_address`` (default: the
    settings'), or a LocalCluster sized by the settings."""
    if kind == "local":
        return InProcessExecutor()
    from engine.execution.dask import DaskExecutor, worker_memory_limit

    address = dask_address or settings.dask_address
    if address:
        return DaskExecutor.start(address)
    workers = settings.dask_workers or os.cpu_count() or 1
    return DaskExecutor.start(
        None, workers, memory_limit=worker_memory_limit(settings.dask_worker_memory, workers)
    )


def _close_all(owned: Sequence[Callable[[], None]]) -> None:
    """Call each of ``owned``, the last first; the first error is raised once all were called."""
    error: BaseException | None = None
    for close in reversed(owned):
        try:
            close()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


@dataclass(frozen=True)
class UnstartedServices:
    """A run's store and cache, open, and its executor not started yet.

    :meth:`start` starts the executor (``start_executor``) and returns the :class:`JobServices`,
    whose ``close`` stops that executor if it was started here (``owns_executor``); :meth:`close`
    closes what was opened for this object (``owned``: the store, unless lent), after that.
    """

    settings: Settings
    store: JobStore
    cache: CacheConfig | None
    start_executor: Callable[[], Executor]
    owns_executor: bool
    owned: tuple[Callable[[], None], ...] = ()

    def start(self) -> JobServices:
        """The services with the executor started."""
        executor = self.start_executor()
        return JobServices(
            settings=self.settings,
            store=self.store,
            cache=self.cache,
            executor=executor,
            owned=(executor.close,) if self.owns_executor else (),
        )

    def close(self) -> None:
        """Close the store (if opened here); the first error is raised."""
        _close_all(self.owned)


def lent_or_opened_executor(
    executor: Executor | None, open_one: Callable[[], Executor]
) -> tuple[Callable[[], Executor], bool]:
    """How a run gets its executor: the lent ``executor`` (the caller closes it), else ``open_one``
    (the run closes it); and whether the run owns it."""
    if executor is not None:
        lent = executor
        return (lambda: lent), False
    return open_one, True


def services_from_settings(
    settings: Settings,
    *,
    store: JobStore | None = None,
    executor: Executor | None = None,
    kind: ExecutorKind = "dask",
    dask_address: str | None = None,
) -> UnstartedServices:
    """A run's services from the settings, before its executor starts: their cache, ``store`` if
    lent (the caller closes it) else the settings' store, and ``executor`` if lent else one that
    :func:`open_executor` starts."""
    start_executor, owns_executor = lent_or_opened_executor(
        executor, partial(open_executor, kind, dask_address, settings)
    )
    owned: tuple[Callable[[], None], ...] = ()
    if store is None:
        store = JobStore.from_settings(settings)
        owned = (store.close,)
    return UnstartedServices(
        settings=settings,
        store=store,
        cache=CacheConfig.from_settings(settings),
        start_executor=start_executor,
        owns_executor=owns_executor,
        owned=owned,
    )
