"""Prometheus metrics of a running job, and the resource readings kept with each cycle.

Cost is the design constraint: a cycle of 5,000 cheap evaluations must not pay per evaluation.
So :class:`JobMetrics` is a custom collector: once a cycle the loop adds a few numbers (counts,
and the bucket counts :func:`~engine.core.cycle.latency_quantiles` already binned in bulk) under a
lock, and the metric families are built only when Prometheus scrapes, on the HTTP server's thread.
CPU and memory are read by :class:`ResourceSampler` on its own thread every few seconds (the
workers' figures come from the Dask scheduler, a network round trip) and by
:class:`ResourceProbe`, which the record stage calls once a cycle (a clock read).

Every metric has the label ``job_id``; worker metrics also ``worker`` (the worker's address).
Each job's metrics live in a :class:`~prometheus_client.CollectorRegistry` of their own
(:func:`job_registry`), never the process-wide default one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.core.cycle import LATENCY_BUCKETS, CycleRecord, ResourceUsage

__all__ = [
    "CYCLE_BUCKETS",
    "METRICS",
    "JobMetrics",
    "ResourceProbe",
    "ResourceSampler",
    "WorkerReading",
    "WorkerReader",
    "job_registry",
]

log = logging.getLogger(__name__)

CYCLE_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
)  # fmt: skip
"""Upper bounds (seconds) of the cycle duration histogram."""

#: Every metric this module serves: name (as scraped, without histogram suffixes), type, labels
#: and meaning. The README's table and the endpoint test are checked against it.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "irefine_evaluations_total": (
        "counter",
        ("job_id", "status"),
        "evaluations by outcome: ok, failed, cached",
    ),
    "irefine_cache_hits_total": ("counter", ("job_id",), "evaluations answered by the inference cache"),
    "irefine_cache_misses_total": ("counter", ("job_id",), "cache look-ups that missed (then evaluated)"),
    "irefine_cycles_total": ("counter", ("job_id",), "cycles finished by this run"),
    "irefine_cycle_duration_seconds": (
        "histogram",
        ("job_id",),
        "wall time of a cycle's propose and evaluate stages",
    ),
    "irefine_evaluation_duration_seconds": (
        "histogram",
        ("job_id",),
        "time one evaluation took (cached ones excluded)",
    ),
    "irefine_evaluations_per_second": ("gauge", ("job_id",), "throughput of the last cycle"),
    "irefine_best_score": ("gauge", ("job_id",), "the job's best score so far"),
    "irefine_queue_wait_seconds": (
        "gauge",
        ("job_id",),
        "from the flow run's scheduled start to its actual start",
    ),
    "irefine_process_cpu_percent": ("gauge", ("job_id",), "CPU of the flow process (100 = one core)"),
    "irefine_process_resident_memory_bytes": ("gauge", ("job_id",), "resident memory of the flow process"),
    "irefine_workers": ("gauge", ("job_id",), "Dask workers connected"),
    "irefine_worker_cpu_percent": ("gauge", ("job_id", "worker"), "CPU of a Dask worker (100 = one core)"),
    "irefine_worker_memory_bytes": ("gauge", ("job_id", "worker"), "memory of a Dask worker process"),
    "irefine_worker_memory_limit_bytes": (
        "gauge",
        ("job_id", "worker"),
        "memory limit of a Dask worker (its nanny restarts it at 95%)",
    ),
    "irefine_resource_sample_errors_total": ("counter", ("job_id",), "failed CPU/memory readings"),
}


@dataclass(frozen=True, slots=True)
class WorkerReading:
    """One worker's latest CPU (percent of a core), memory and memory limit (bytes)."""

    cpu_percent: float | None
    memory_bytes: int | None
    memory_limit_bytes: int | None


WorkerReader = Callable[[], Mapping[str, WorkerReading]]
"""Reads every worker of the cluster, by worker address (may block on the network)."""


@dataclass(frozen=True, slots=True)
class _Sample:
    process_cpu_percent: float
    process_rss_bytes: int
    workers: Mapping[str, WorkerReading] | None


class ResourceSampler:
    """Reads the flow process's and the workers' CPU and memory on a background thread.

    The first reading is taken as soon as the thread starts, then one every ``interval`` seconds
    until :meth:`stop`. A reading that fails is logged (once until one succeeds) and counted, and
    the previous one stands. Thread-safe: :attr:`latest` is replaced whole.
    """

    def __init__(self, workers: WorkerReader | None = None, interval: float = 2.0) -> None:
        self._read_workers = workers
        self._interval = interval
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # starts the CPU clock the first reading is measured from
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self.latest: _Sample | None = None
        self.errors = 0
        self._failing = False

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sample(self) -> None:
        """Take one reading now (on the calling thread)."""
        try:
            with self._process.oneshot():
                cpu = self._process.cpu_percent(None)
                rss = int(self._process.memory_info().rss)
            workers = self._read_workers() if self._read_workers is not None else None
        except Exception as exc:  # a lost scheduler or /proc hiccup must not end the job
            self.errors += 1
            if not self._failing:
                log.warning("could not read CPU/memory (%s: %s); will retry", type(exc).__name__, exc)
            self._failing = True
            return
        self._failing = False
        self.latest = _Sample(cpu, rss, workers)

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self._interval):
            self.sample()


class ResourceProbe:
    """What a cycle used, read by the record stage on the loop's thread (~2 us).

    The process's CPU is its CPU time (all threads, ``time.process_time``: ~1 us, where psutil's
    ``cpu_times`` costs ~80 us) from the previous call (one cycle) to this one. Memory is the
    sampler's latest reading (at most one interval old); the process's is read directly only
    before the sampler's first reading; the workers' is None until then or without workers.
    """

    def __init__(self, sampler: ResourceSampler | None = None) -> None:
        self._sampler = sampler
        self._process = psutil.Process()
        self._last = (time.monotonic(), time.process_time())

    def __call__(self) -> ResourceUsage:
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._last
        self._last = (now, cpu)
        sample = self._sampler.latest if self._sampler is not None else None
        workers = sample.workers if sample is not None else None
        memory = [w.memory_bytes for w in workers.values() if w.memory_bytes is not None] if workers else []
        return ResourceUsage(
            process_cpu_percent=100.0 * (cpu - cpu_then) / (now - then) if now > then else None,
            process_rss_bytes=sample.process_rss_bytes if sample else int(self._process.memory_info().rss),
            worker_memory_total_bytes=sum(memory) if memory else None,
            worker_memory_max_bytes=max(memory) if memory else None,
        )


class JobMetrics:
    """The Prometheus collector of one job: fed by :meth:`observe_cycle`, read on scrape.

    ``observe_cycle`` costs a few microseconds whatever the cycle's size (no per-evaluation
    ``observe``); ``collect`` runs on the scraping thread. Both take one lock.
    """

    def __init__(self, job_id: str, sampler: ResourceSampler | None = None) -> None:
        self.job_id = job_id
        self._sampler = sampler
        self._lock = threading.Lock()
        self._evaluations = {"ok": 0, "failed": 0, "cached": 0}
        self._cache_misses = 0
        self._cycles = 0
        self._cycle_counts = [0] * len(CYCLE_BUCKETS)
        self._cycle_seconds = 0.0
        self._latency_counts = [0] * len(LATENCY_BUCKETS)
        self._latency_count = 0
        self._latency_seconds = 0.0
        self._per_second: float | None = None
        self._best: float | None = None
        self.queue_wait_seconds: float | None = None

    def observe_cycle(self, record: CycleRecord, cache_misses: int = 0) -> None:
        """Count one finished cycle (``cache_misses``: its look-ups that missed)."""
        latency = record.latency
        with self._lock:
            self._evaluations["ok"] += record.evaluations - record.failed - record.cached
            self._evaluations["failed"] += record.failed
            self._evaluations["cached"] += record.cached
            self._cache_misses += cache_misses
            self._cycles += 1
            for i, bound in enumerate(CYCLE_BUCKETS):
                if record.duration <= bound:
                    self._cycle_counts[i] += 1
            self._cycle_seconds += record.duration
            if latency is not None:
                self._latency_counts = [
                    a + b for a, b in zip(self._latency_counts, latency.cumulative_counts, strict=True)
                ]
                self._latency_count += latency.count
                self._latency_seconds += latency.total
            self._per_second = record.evaluations_per_second
            self._best = record.best_score

    def collect(self) -> Iterator[Metric]:
        """The metric families, built now (the registry calls this on each scrape)."""
        job = [self.job_id]
        with self._lock:
            evaluations = dict(self._evaluations)
            misses, cycles = self._cache_misses, self._cycles
            cycle_hist = (list(self._cycle_counts), self._cycles, self._cycle_seconds)
            latency_hist = (list(self._latency_counts), self._latency_count, self._latency_seconds)
            per_second, best, wait = self._per_second, self._best, self.queue_wait_seconds

        def doc(name: str) -> str:
            return METRICS[name][2]

        family = CounterMetricFamily(
            "irefine_evaluations", doc("irefine_evaluations_total"), labels=["job_id", "status"]
        )
        for status, count in evaluations.items():
            family.add_metric([self.job_id, status], count)
        yield family
        for name, value in (
            ("irefine_cache_hits", evaluations["cached"]),
            ("irefine_cache_misses", misses),
            ("irefine_cycles", cycles),
            ("irefine_resource_sample_errors", self._sampler.errors if self._sampler else 0),
        ):
            yield _counter(name, doc(name + "_total"), job, value)
        yield _histogram("irefine_cycle_duration_seconds", doc, job, CYCLE_BUCKETS, *cycle_hist)
        yield _histogram("irefine_evaluation_duration_seconds", doc, job, LATENCY_BUCKETS, *latency_hist)
        yield from _gauges(
            job,
            doc,
            irefine_evaluations_per_second=per_second,
            irefine_best_score=best,
            irefine_queue_wait_seconds=wait,
        )
        yield from self._resources(job, doc)

    def _resources(self, job: list[str], doc: Callable[[str], str]) -> Iterator[Metric]:
        sample = self._sampler.latest if self._sampler is not None else None
        if sample is None:
            return
        yield from _gauges(
            job,
            doc,
            irefine_process_cpu_percent=sample.process_cpu_percent,
            irefine_process_resident_memory_bytes=sample.process_rss_bytes,
        )
        if sample.workers is None:
            return
        yield from _gauges(job, doc, irefine_workers=len(sample.workers))
        for name, attribute in (
            ("irefine_worker_cpu_percent", "cpu_percent"),
            ("irefine_worker_memory_bytes", "memory_bytes"),
            ("irefine_worker_memory_limit_bytes", "memory_limit_bytes"),
        ):
            family = GaugeMetricFamily(name, doc(name), labels=["job_id", "worker"])
            for worker, reading in sorted(sample.workers.items()):
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric([self.job_id, worker], value)
            yield family


def _counter(name: str, documentation: str, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["job_id"])
    family.add_metric(labels, value)
    return family


def _gauges(labels: list[str], doc: Callable[[str], str], **values: float | None) -> Iterator[Metric]:
    """One gauge family a known value; unknown values (None) are left out rather than shown as 0."""
    for name, value in values.items():
        if value is not None:
            family = GaugeMetricFamily(name, doc(name), labels=["job_id"])
            family.add_metric(labels, value)
            yield family


def _histogram(
    name: str,
    doc: Callable[[str], str],
    labels: list[str],
    bounds: tuple[float, ...],
    cumulative: list[int],
    count: int,
    total: float,
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc(name), labels=["job_id"])
    buckets = [(repr(float(b)), float(c)) for b, c in zip(bounds, cumulative, strict=True)]
    family.add_metric(labels, [*buckets, ("+Inf", float(count))], sum_value=total)
    return family


def job_registry(metrics: JobMetrics) -> CollectorRegistry:
    """A registry of its own serving ``metrics`` (never the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry
