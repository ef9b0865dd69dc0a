"""What metrics cost the loop's thread per cycle of 5,000 evaluations (budget: under 1 ms).

Times, on this process's thread, each per-cycle step the metrics add: the latency quantiles and
histogram counted in bulk by ``account_cycle`` (numpy), the resource probe of the record stage
(two ``/proc`` reads), and the observer's update of the Prometheus collector. For scale it also
times the naive way, ``Histogram.observe`` once per evaluation. Run from the repository root::

    .venv/bin/python bench/metrics.py

The last line on stdout is one JSON object; figures are the best of several repetitions.
"""

from __future__ import annotations

import json
import random
import sys
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry, Histogram  # noqa: E402

from engine.core import LATENCY_BUCKETS, Evaluation, Progress, Status, account_cycle  # noqa: E402
from engine.core.cycle import latency_quantiles  # noqa: E402
from engine.observe.metrics import JobMetrics, ResourceProbe, ResourceSampler  # noqa: E402

BATCH = 5000


def best_microseconds(fn: Any, number: int = 50, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    rng = random.Random(0)
    evaluations = [Evaluation(rng.random(), duration=rng.expovariate(1e4)) for _ in range(BATCH)]
    evaluations[::50] = [Evaluation(0.5, Status.CACHED, duration=0.01)] * len(evaluations[::50])
    candidates = [{"x": rng.random()} for _ in range(BATCH)]
    durations = [e.duration for e in evaluations if e.status is not Status.CACHED]
    _, record = account_cycle(
        Progress(), candidates, evaluations, maximize=False, tolerance=0.0, duration=1.0
    )

    sampler = ResourceSampler(None)
    sampler.sample()
    probe = ResourceProbe(sampler)
    metrics = JobMetrics("bench", sampler)
    histogram = Histogram("naive", "naive", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())

    def naive() -> None:
        for d in durations:
            histogram.observe(d)

    figures = {
        "latency_quantiles_us": best_microseconds(lambda: latency_quantiles(durations)),
        "resource_probe_us": best_microseconds(probe, number=500),
        "observe_cycle_us": best_microseconds(lambda: metrics.observe_cycle(record, 10), number=500),
        "account_cycle_us": best_microseconds(
            lambda: account_cycle(
                Progress(), candidates, evaluations, maximize=False, tolerance=0.0, duration=1.0
            ),
            number=20,
        ),
        "naive_observe_each_us": best_microseconds(naive, number=5),
    }
    added = figures["latency_quantiles_us"] + figures["resource_probe_us"] + figures["observe_cycle_us"]
    figures["metrics_per_cycle_us"] = added
    figures["naive_over_bulk"] = figures["naive_observe_each_us"] / added
    for name, value in figures.items():
        print(f"{name:>24}: {value:,.1f}", file=sys.stderr)
    print(json.dumps({"bench": "metrics", "batch": BATCH, **{k: round(v, 1) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
