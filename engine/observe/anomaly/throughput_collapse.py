"""``throughput_collapse``: cycles markedly slower than usual, in their time or in their computed
evaluations per second, while each evaluation costs what it used to: the executor sat idle."""

from __future__ import annotations

import math

from engine.observe.anomaly.episodes import Evidence
from engine.observe.anomaly.timing import TimingExcess


def throughput_collapse_evidence(x: TimingExcess, z_bound: float) -> Evidence | None:
    """The evidence of an idle executor at ``z_bound`` robust deviations, or None."""
    # An idle executor makes the cycle markedly slower, and shows in its time or in its
    # evaluations per second. Cache hits make the evaluations computed per cycle vary, and
    # with them the throughput: a cycle that computed few in the usual time was not idle.
    tp_drop, z_tp = x.throughput_drop, x.throughput_z
    by_throughput = tp_drop is not None and z_tp is not None and z_tp > z_bound and tp_drop > x.min_excess
    if x.log_throughput is None or x.slowed <= x.min_excess or x.costlier:
        return None
    if x.duration_z > z_bound:  # this cycle's evaluations at the usual cycle time, against its time
        normal_tp, drop, z = x.log_throughput + x.slowed, x.slowed, x.duration_z
    elif by_throughput:
        assert tp_drop is not None and z_tp is not None
        normal_tp, drop, z = x.usual_log_throughput, tp_drop, z_tp
    else:
        return None
    return {
        "evaluations_per_second": math.exp(normal_tp - drop),
        "usual_evaluations_per_second": math.exp(normal_tp),
        "ratio": math.exp(-drop),
        "robust_z": z,
        "evaluation_cost_ratio": None if x.cost_up is None else math.exp(x.cost_up),
    }


def throughput_collapse_message(cycle: int, cycles: int, e: Evidence) -> str:
    return (
        f"cycle {cycle}: evaluations/s fell to {e['ratio']:.0%} of the usual "
        f"{e['usual_evaluations_per_second']:.3g} for {cycles} cycles while each evaluation costs as "
        "usual: the executor sat idle (lost workers, a stalled scheduler, store or cache?)"
    )
