"""Observers of a ``refine`` flow run: what watches each cycle besides the job itself.

Each observer factory the flow hands :class:`Observers` (``flows.observer_set.DEFAULT_OBSERVERS``:
metrics, anomalies, deadline, artifacts) is called once per flow run with the job and an
:class:`ObserverContext`; it returns an :class:`Observer` (or None to sit this run out). The flow
calls every observer with each committed cycle's record; an observer returns the findings it made
of it (most return none), and :class:`Observers` hands them all to the run's ``report`` (log,
events, store: ``flows.observer_set.report_findings``), so no observer writes the job's record
itself. ``finish`` is called once when the run ends, however it ends. Observers must be quick
(they run on the loop's thread) and must never fail the job: the flow logs and drops an observer
that raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.core import CycleRecord
from engine.execution import Executor
from engine.observe import Finding
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
    def __call__(self, job: Job, record: CycleRecord) -> Sequence[Finding]:
        """The findings this observer made of ``record`` (empty for most)."""
        ...

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None: ...


ObserverFactory = Callable[[Job, ObserverContext], "Observer | None"]
FindingsReport = Callable[[Job, Sequence[Finding], ObserverContext], None]
"""What a run does with the findings of a cycle (``flows.observer_set.report_findings``)."""


class Observers:
    """The observers of one flow run, made by ``factories`` in order; the findings they return for
    a cycle go to ``report`` together. An observer that raises is logged once and dropped; a report
    that raises is logged, and the job goes on."""

    def __init__(
        self,
        job: Job,
        context: ObserverContext,
        factories: Sequence[ObserverFactory],
        report: FindingsReport,
    ) -> None:
        self._context = context
        self._report = report
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
        findings: list[Finding] = []
        for observer in list(self._observers):
            try:
                findings.extend(observer(job, record))
            except Exception:
                self._context.logger.exception("observer %r failed; dropped for this run", observer)
                self._observers.remove(observer)
        if findings:
            try:
                self._report(job, findings, self._context)
            except Exception:
                self._context.logger.exception(
                    "job %s: could not report %d findings", job.job_id, len(findings)
                )

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        for observer in self._observers:
            try:
                observer.finish(job, result, error)
            except Exception:
                self._context.logger.exception("observer %r failed to finish", observer)
