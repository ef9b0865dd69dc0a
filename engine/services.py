"""The composition root: everything one job run needs besides its spec, built in one place.

:func:`services_from_settings` builds a :class:`JobServices` from :class:`~engine.settings.Settings`;
``blocks.services`` builds the same object from saved Prefect blocks, with the same defaults. The
``refine`` flow adds its Prefect stage runner, observers and slots with :meth:`JobServices.with_run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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

__all__ = ["ExecutorKind", "JobServices", "open_executor", "services_from_settings"]

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
        error: BaseException | None = None
        for close in reversed(self.owned):
            try:
                close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


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


def services_from_settings(
    settings: Settings,
    *,
    store: JobStore | None = None,
    executor: Executor | None = None,
    kind: ExecutorKind = "dask",
    dask_address: str | None = None,
) -> JobServices:
    """Services from the settings: their cache, ``store`` and ``executor`` if lent (the caller
    closes those), else the settings' store and one opened by :func:`open_executor` (closed by
    :meth:`JobServices.close`)."""
    owned: list[Callable[[], None]] = []
    if store is None:
        store = JobStore.from_settings(settings)
        owned.append(store.close)
    try:
        if executor is None:
            executor = open_executor(kind, dask_address, settings)
            owned.append(executor.close)
    except BaseException:
        for close in owned:
            close()
        raise
    return JobServices(
        settings=settings,
        store=store,
        cache=CacheConfig.from_settings(settings),
        executor=executor,
        owned=tuple(owned),
    )
