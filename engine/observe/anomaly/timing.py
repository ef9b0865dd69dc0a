"""The learned normal of a job's cycle timing (log duration, log evaluations per second, log
evaluation seconds per candidate), and how a cycle compares with it; ``slow_cycle`` and
``throughput_collapse`` judge that comparison."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.stats import robust_z


@dataclass(frozen=True, slots=True)
class TimingExcess:
    """How one cycle's timing compares with the learned normal, in logs (None: not measurable yet)."""

    log_duration: float
    usual_log_duration: float
    duration_z: float
    cost_up: float | None
    """Log evaluation cost per candidate above its usual (median)."""
    cost_z: float | None
    log_throughput: float | None
    usual_log_throughput: float
    throughput_drop: float | None
    throughput_z: float | None
    """Robust deviations of the throughput *below* its usual."""
    min_excess: float
    """``log(timing_min_ratio)``: the least slow-down that counts."""

    @property
    def slowed(self) -> float:
        """Log duration above the usual."""
        return self.log_duration - self.usual_log_duration

    @property
    def costlier(self) -> bool:
        """Whether costlier evaluations explain at least half of the slow-down (slow_cycle's cause;
        otherwise the executor sat idle: throughput_collapse's)."""
        return self.cost_up is None or self.cost_up >= 0.5 * max(self.slowed, self.throughput_drop or 0.0)


class TimingNormal:
    """The last ``timing_window`` normal cycles' log durations, log throughputs and log costs."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.duration: deque[float] = deque(maxlen=config.timing_window)
        self.throughput: deque[float] = deque(maxlen=config.timing_window)
        self.cost: deque[float] = deque(maxlen=config.timing_window)

    def learn(self, log_d: float, log_tp: float | None, log_cost: float | None) -> None:
        self.duration.append(log_d)
        if log_tp is not None:
            self.throughput.append(log_tp)
        if log_cost is not None:
            self.cost.append(log_cost)

    def excess(self, log_d: float, log_tp: float | None, log_cost: float | None) -> TimingExcess:
        """This cycle against the learned normal (cost and throughput once ``timing_warmup`` of them
        were learned)."""
        c = self.config
        normal_d, z_d = robust_z(log_d, self.duration, c.timing_sigma_floor)
        cost_up = z_cost = None
        if log_cost is not None and len(self.cost) >= c.timing_warmup:
            usual_cost = statistics.median(self.cost)
            cost_up = log_cost - usual_cost
            _, z_cost = robust_z(cost_up + usual_cost, self.cost, c.timing_sigma_floor)
        tp_drop = z_tp = None
        normal_tp = 0.0
        if log_tp is not None and len(self.throughput) >= c.timing_warmup:
            normal_tp, z_tp = robust_z(log_tp, self.throughput, c.timing_sigma_floor)
            tp_drop, z_tp = normal_tp - log_tp, -z_tp
        return TimingExcess(
            log_duration=log_d,
            usual_log_duration=normal_d,
            duration_z=z_d,
            cost_up=cost_up,
            cost_z=z_cost,
            log_throughput=log_tp,
            usual_log_throughput=normal_tp,
            throughput_drop=tp_drop,
            throughput_z=z_tp,
            min_excess=math.log(c.timing_min_ratio),
        )
