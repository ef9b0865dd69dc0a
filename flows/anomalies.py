"""The anomaly observer of a ``refine`` flow run, which returns what the job's detector finds in
each cycle, and :func:`report_findings`, which the run's :class:`~flows.observers.Observers` hands
every finding to: it becomes a log line, a Prefect event and a row of the job's ``anomalies``.

Events are named ``refinement.anomaly.<kind>`` (kinds: ``engine.observe.ANOMALY_KINDS``), with the
job as their resource (``irefine.job.<job_id>``), the flow run as a related resource, and
``{"job_id", "cycle", "message", "evidence": {...}}`` as payload: automations match on them (the
``irefine setup`` alert notifies on ``refinement.anomaly.*`` with the message and evidence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.core import CycleRecord
from engine.observe import AnomalyDetector, Finding
from engine.runner import Job, anomaly_config
from flows.observers import ObserverContext


def anomaly_event_resource(job_id: str) -> dict[str, str]:
    """The Prefect resource of a job's anomaly events."""
    return {
        "prefect.resource.id": f"irefine.job.{job_id}",
        "prefect.resource.name": job_id,
        "irefine.job-id": job_id,
    }


def emit_findings(job_id: str, findings: Sequence[Finding], flow_run_id: str | None) -> None:
    """Send one Prefect event per finding (buffered by Prefect's events worker: returns at once)."""
    from prefect.events import emit_event

    related = []
    if flow_run_id:
        related = [
            {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}
        ]
    for finding in findings:
        emit_event(
            finding.event,
            resource=anomaly_event_resource(job_id),
            related=related or None,
            payload={
                "job_id": job_id,
                "cycle": finding.cycle,
                "message": finding.message,
                "evidence": finding.evidence,
            },
        )


def report_findings(job: Job, findings: Sequence[Finding], context: ObserverContext) -> None:
    """Log, emit (one event each) and store the findings of a cycle."""
    for finding in findings:
        context.logger.warning(
            "job %s: anomaly %s at cycle %d: %s", job.job_id, finding.kind, finding.cycle, finding.message
        )
    emit_findings(job.job_id, findings, context.flow_run_id)
    context.store.add_anomalies(job.job_id, findings)


class AnomalyObserver:
    """Feeds each committed cycle to the job's :class:`AnomalyDetector`; returns what it finds."""

    def __init__(self, detector: AnomalyDetector) -> None:
        self._detector = detector

    def __call__(self, job: Job, record: CycleRecord) -> Sequence[Finding]:
        return self._detector.observe(record)

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        """Nothing to close: the run reported and stored the findings as they came."""


def anomaly_observer(job: Job, context: ObserverContext) -> AnomalyObserver:
    """The observer factory of ``flows.observer_set.DEFAULT_OBSERVERS``.

    On resume the detector is rebuilt from the job's stored cycles, so a stall or a learned
    normal cycle time carries over, and an episode reported before the crash is not reported again.
    """
    detector = AnomalyDetector.rebuild(
        context.store.cycles(job.job_id, fresh=True),
        maximize=job.maximize,
        target=job.spec.target,
        tolerance=job.spec.tolerance,
        config=anomaly_config(job.spec),
    )
    return AnomalyObserver(detector)
