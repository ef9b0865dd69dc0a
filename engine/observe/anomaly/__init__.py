"""Anomaly detection on a job's per-cycle series: fed one :class:`~engine.core.CycleRecord` at a
time by :meth:`AnomalyDetector.observe`, it returns :class:`Finding` s, at most one per episode of
each kind (``failure_burst``, ``stall``, ``regression``, ``slow_cycle``, ``throughput_collapse``).
Pure logic; the rules and their bounds: docs/anomaly-detection.md."""

from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.detector import AnomalyDetector
from engine.observe.anomaly.episodes import ANOMALY_KINDS, Finding
from engine.observe.anomaly.stats import binomial_upper_tail
from engine.observe.anomaly.trend import fit_floor as _fit_floor  # noqa: F401  (tests import it)

__all__ = ["ANOMALY_KINDS", "AnomalyDetector", "DetectorConfig", "Finding", "binomial_upper_tail"]
