"""The observers every ``refine`` flow run starts, in the order they run after each cycle, and
what the run does with their findings (:func:`report_findings`: log, event, store)."""

from __future__ import annotations

from flows.anomalies import anomaly_observer, report_findings
from flows.artifacts import artifact_observer
from flows.deadline import deadline_observer
from flows.metrics import metrics_observer
from flows.observers import ObserverFactory

__all__ = ["DEFAULT_OBSERVERS", "report_findings"]

DEFAULT_OBSERVERS: tuple[ObserverFactory, ...] = (
    metrics_observer,
    anomaly_observer,
    deadline_observer,
    artifact_observer,
)
