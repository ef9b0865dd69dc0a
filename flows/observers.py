"""Observers of a ``refine`` flow run: what watches each cycle besides the job itself.

Each observer factory the flow hands :class:`Observers` (``flows.observer_set.DEFAULT_OBSERVERS``:
metrics, anomalies, deadline, artifacts) is called once per flow run with the job and an
:class:`ObserverContext`; it returns an :class:`Observer` (or None to sit this run out). The flow
calls every observer after each committed cycle, and ``finish`` once when the run ends, however it
ends. Observers must be quick (they run on the loop's thread) and must never fail the job: the flow
logs and drops an observer that raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.core import CycleRecord
from engine.execution import Executor
from engine.observe.metrics import ResourceSampler
from engine.runner import Job
from engine.settings import Settings
from engine.store import JobStore


@dataclass(frozen=True)
class ObserverContext:
    """What an observer may use: the run's store, settings, logger, Prefect flow run id, executor
    and the run's resource sampler."""

    store: JobStore
    settings: Settings
    logger: logging.Logger | logging.LoggerAdapter[Any]
    flow_run_id: str | None
    executor: Executor | None = None
    sampler: ResourceSampler | None = None


class Observer(Protocol):
    def __call__(self, job: Job, record: CycleRecord) -> None: ...

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None: ...


ObserverFactory = Callable[[Job, ObserverContext], "Observer | None"]


class Observers:
    """The observers of one flow run, made by ``factories`` in order; an observer that raises is
    logged once and dropped."""

    def __init__(self, job: Job, context: ObserverContext, factories: Sequence[ObserverFactory]) -> None:
        self._context = context
        self._observers: list[Observer] = []
        for factory in factories:
            try:
                observer = factory(job, context)
            except Exception:
                name = getattr(factory, "__name__", repr(factory))
                context.logger.exception("observer %s could not start; the job goes on without it", name)
                continue
            if observer is not None:
                self._observers.append(observer)

    def __call__(self, job: Job, record: CycleRecord) -> None:
        for observer in list(self._observers):
            try:
                observer(job, record)
            except Exception:
                self._context.logger.exception("observer %r failed; dropped for this run", observer)
                self._observers.remove(observer)

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        for observer in self._observers:
            try:
                observer.finish(job, result, error)
            except Exception:
                self._context.logger.exception("observer %r failed to finish", observer)
