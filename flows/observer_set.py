"""The observers every ``refine`` flow run starts, in the order they run after each cycle."""

from __future__ import annotations

from flows.anomalies import anomaly_observer
from flows.artifacts import artifact_observer
from flows.deadline import deadline_observer
from flows.metrics import metrics_observer
from flows.observers import ObserverFactory

DEFAULT_OBSERVERS: tuple[ObserverFactory, ...] = (
    metrics_observer,
    anomaly_observer,
    deadline_observer,
    artifact_observer,
)
