"""``slow_cycle``: cycles markedly slower than the job's learned normal, and costlier evaluations
explain at least half of it (or a cycle over ``max_cycle_seconds``)."""

from __future__ import annotations

import math

from engine.observe.anomaly.episodes import Evidence
from engine.observe.anomaly.timing import TimingExcess


def slow_cycle_evidence(x: TimingExcess, z_bound: float) -> Evidence | None:
    """The evidence of a slow cycle at ``z_bound`` robust deviations, or None."""
    slow = x.duration_z > z_bound and x.slowed > x.min_excess
    # Evaluation seconds per candidate are far steadier than wall time: a marked rise there
    # with a slower cycle is a slow cycle even when wall-time noise hides it.
    if x.cost_up is not None and x.cost_z is not None and not slow:
        slow = x.cost_z > z_bound and x.cost_up > x.min_excess and x.slowed > 0.5 * x.cost_up
    if not (slow and x.costlier):
        return None
    return {
        "duration": math.exp(x.log_duration),
        "usual_duration": math.exp(x.usual_log_duration),
        "ratio": math.exp(x.slowed),
        "robust_z": x.duration_z,
        "evaluation_cost_ratio": None if x.cost_up is None else math.exp(x.cost_up),
    }


def slow_cycle_message(cycle: int, cycles: int, e: Evidence) -> str:
    cost = e["evaluation_cost_ratio"]
    because = f"; each evaluation costs {cost:.1f}x as much" if cost is not None else ""
    return (
        f"cycle {cycle}: cycles take {e['ratio']:.1f}x their usual {e['usual_duration']:.3g} s "
        f"({e['robust_z']:.1f} robust deviations) for {cycles} cycles{because}"
    )
