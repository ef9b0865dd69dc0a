"""Observability of refinement jobs: anomaly detection on each job's per-cycle series."""

from engine.observe.anomaly import ANOMALY_KINDS, AnomalyDetector, DetectorConfig, Finding

__all__ = ["ANOMALY_KINDS", "AnomalyDetector", "DetectorConfig", "Finding"]
