"""The metrics observer of a ``refine`` flow run: resources kept per cycle, and Prometheus.

For the whole run it

- feeds the CPU and memory sampled by :func:`start_resource_sampler` (the flow process, and each
  Dask worker through the scheduler; the flow hands the loop a probe of it, so every stored cycle
  carries them) and each cycle's figures to the job's metrics;
- with ``IRE_METRICS_PORT`` set, serves the job's metrics (``engine.observe.metrics``) on
  ``http://IRE_METRICS_ADDR:PORT/metrics`` until the run ends.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from engine.core import CycleRecord
from engine.observe.metrics import (
    JobMetrics,
    ResourceSampler,
    WorkerReader,
    WorkerReading,
    job_registry,
)
from engine.runner import Job
from flows.observers import ObserverContext

SAMPLE_SECONDS = 2.0
"""How often CPU and memory are read (the workers' through one round trip to the scheduler)."""


def dask_worker_reader(client: Any) -> WorkerReader:
    """Reads every worker's CPU, memory and memory limit from the Dask scheduler, by address."""

    def read() -> Mapping[str, WorkerReading]:
        workers: dict[str, Any] = client.scheduler_info(n_workers=-1).get("workers", {})
        readings = {}
        for address, info in workers.items():
            metrics = info.get("metrics", {})
            cpu, memory, limit = metrics.get("cpu"), metrics.get("memory"), info.get("memory_limit")
            readings[address] = WorkerReading(
                cpu_percent=None if cpu is None else float(cpu),
                memory_bytes=None if memory is None else int(memory),
                memory_limit_bytes=int(limit) if limit else None,  # 0: no limit
            )
        return readings

    return read


def queue_wait_seconds() -> float | None:
    """Seconds from this flow run's expected start to its actual start (None outside a run)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    run = context.flow_run
    expected = run.expected_start_time
    if expected is None:
        return None
    # The engine keeps the flow run of the context up to date by state, not by start_time: the
    # Running state's timestamp is when the run actually started.
    state = run.state
    started = state.timestamp if state is not None and state.is_running() else datetime.now(UTC)
    return max(0.0, (started - expected).total_seconds())


def start_resource_sampler(executor: Any) -> ResourceSampler:
    """A started sampler of this process's and, on Dask, the workers' CPU and memory (the caller
    stops it)."""
    client = getattr(executor, "client", None)  # a DaskExecutor's; the in-process one has none
    return ResourceSampler(dask_worker_reader(client) if client is not None else None, SAMPLE_SECONDS).start()


class MetricsObserver:
    """Feeds the job's metrics once a cycle; at finish stops the endpoint."""

    def __init__(
        self,
        job: Job,
        metrics: JobMetrics | None,
        server: tuple[WSGIServer, threading.Thread] | None,
    ) -> None:
        self._metrics = metrics
        self._server = server
        self._misses_seen = job.progress.cache_misses

    def __call__(self, job: Job, record: CycleRecord) -> tuple[()]:
        misses, self._misses_seen = job.progress.cache_misses - self._misses_seen, job.progress.cache_misses
        if self._metrics is not None:
            self._metrics.observe_cycle(record, misses)
        return ()

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join()


def metrics_observer(job: Job, context: ObserverContext) -> MetricsObserver:
    """The observer factory of ``flows.observer_set.DEFAULT_OBSERVERS``."""
    settings = context.settings
    sampler = context.sampler or ResourceSampler()
    metrics: JobMetrics | None = None
    server: tuple[WSGIServer, threading.Thread] | None = None
    if settings.metrics_port:
        metrics = JobMetrics(job.job_id, sampler)
        metrics.queue_wait_seconds = queue_wait_seconds()
        address = f"{settings.metrics_addr}:{settings.metrics_port}"
        try:
            server = start_http_server(settings.metrics_port, settings.metrics_addr, job_registry(metrics))
        except OSError as exc:
            context.logger.error(
                "metrics endpoint off: cannot listen on %s (%s); set IRE_METRICS_PORT to a free port",
                address,
                exc.strerror or exc,
            )
        else:
            context.logger.info("metrics of job %s on http://%s/metrics", job.job_id, address)
    return MetricsObserver(job, metrics, server)
