"""Metrics, per-cycle measurements, structured logs and worker self-healing, on the real things:
a Prefect server, a Dask LocalCluster, the HTTP endpoint scraped while the job runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.core import LATENCY_BUCKETS, Evaluation, JobSpec, Status, account_cycle
from engine.core.cycle import Progress, latency_quantiles
from engine.observe.logs import JsonLogFormatter, RunContextFormatter, bind_log_context, set_log_cycle
from engine.observe.metrics import METRICS, JobMetrics, job_registry
from engine.settings import load_settings
from engine.store import JobStatus, JobStore
from tests.test_cli import irefine

ROOT = Path(__file__).resolve().parents[1]


def samples(text: str) -> dict[str, list[Any]]:
    """Scraped samples by sample name (``x_total``, ``x_bucket``, ...)."""
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(scraped: dict[str, list[Any]], name: str, **labels: str) -> float:
    matching = [s.value for s in scraped[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, scraped.get(name))
    return float(matching[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pure parts ------------------------------------------------------------------------------------


def test_latency_quantiles_are_nearest_rank_and_buckets_cumulative() -> None:
    durations = [0.001 * i for i in range(1, 101)]  # 1 ms .. 100 ms
    p50, p95, p_max, histogram = latency_quantiles(durations) or pytest.fail("no summary")
    assert (p50, p95, p_max) == pytest.approx((0.050, 0.095, 0.100))
    counts = dict(zip(LATENCY_BUCKETS, histogram.cumulative_counts, strict=True))
    assert counts[0.001] == 1 and counts[0.005] == 5 and counts[0.05] == 50 and counts[0.1] == 100
    assert histogram.count == 100 and histogram.total == pytest.approx(sum(durations))
    assert latency_quantiles([]) is None


def test_cycle_record_measures_computed_evaluations_only() -> None:
    evaluations = [
        Evaluation(1.0, duration=0.2),
        Evaluation(2.0, duration=0.4),
        Evaluation(None, Status.FAILED, duration=0.6),
    ]
    evaluations.append(Evaluation(0.5, Status.CACHED, duration=30.0))  # its original cost: not paid now
    candidates = [{"x": float(i)} for i in range(4)]
    _, record = account_cycle(
        Progress(), candidates, evaluations, maximize=False, tolerance=0.0, duration=2.0
    )
    assert (record.eval_p50, record.eval_p95, record.eval_max) == pytest.approx((0.4, 0.6, 0.6))
    assert record.latency is not None and record.latency.count == 3
    assert record.eval_seconds == pytest.approx(31.2)  # unchanged meaning: every evaluation's duration
    assert record.evaluations_per_second == pytest.approx(2.0)
    assert record.process_rss_bytes is None  # not measured without a probe


def test_job_metrics_expose_bulk_counts_as_prometheus_histograms() -> None:
    metrics = JobMetrics("job-a")
    progress = Progress()
    for cycle_durations in ([0.002] * 3 + [0.2], [0.02] * 4):
        evaluations = [Evaluation(float(i), duration=d) for i, d in enumerate(cycle_durations)]
        candidates = [{"x": float(i)} for i in range(len(evaluations))]
        progress, record = account_cycle(
            progress, candidates, evaluations, maximize=False, tolerance=0, duration=0.5
        )
        metrics.observe_cycle(record, cache_misses=4)
    scraped = samples(generate_latest(job_registry(metrics)).decode())
    bucket = {s.labels["le"]: s.value for s in scraped["irefine_evaluation_duration_seconds_bucket"]}
    assert bucket["0.001"] == 0 and bucket["0.0025"] == 3 and bucket["0.025"] == 7 and bucket["+Inf"] == 8
    assert value(scraped, "irefine_evaluation_duration_seconds_sum") == pytest.approx(0.286)
    assert value(scraped, "irefine_cycle_duration_seconds_count") == 2
    assert value(scraped, "irefine_evaluations_total", status="ok") == 8
    assert value(scraped, "irefine_cache_misses_total", job_id="job-a") == 8
    assert value(scraped, "irefine_best_score") == 0.0
    assert value(scraped, "irefine_evaluations_per_second") == pytest.approx(8.0)


def test_json_log_lines_and_run_log_prefix_carry_the_bound_context() -> None:
    record = logging.LogRecord("engine.runner", logging.WARNING, __file__, 1, "slow %s", ("cycle",), None)
    undo = bind_log_context(job_id="job-b", flow_run_id="run-1")
    try:
        set_log_cycle(7)
        line = json.loads(JsonLogFormatter().format(record))
        prefixed = RunContextFormatter().format(record)
    finally:
        undo()
    assert (
        line["message"] == "slow cycle" and line["level"] == "WARNING" and line["logger"] == "engine.runner"
    )
    assert (line["job_id"], line["cycle"], line["flow_run_id"]) == ("job-b", 7, "run-1")
    assert line["timestamp"].endswith("+00:00")
    assert prefixed == "[job job-b cycle 7] slow cycle"
    assert json.loads(JsonLogFormatter().format(record))["job_id"] is None  # unbound again


def test_readme_documents_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, (kind, labels, _) in METRICS.items():
        assert f"| `{name}` | {kind} | {', '.join(labels)} |" in readme, name


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("IRE_METRICS_PORT", "nine", "valid integer"),
        ("IRE_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("IRE_LOG_FORMAT", "xml", "'text' or 'json'"),
        ("IRE_DASK_WORKER_MEMORY", "0", "positive size such as 2GiB"),
        ("IRE_DASK_WORKER_MEMORY", "lots", "positive size such as 2GiB"),
    ],
)
def test_bad_settings_name_their_variable(monkeypatch, variable: str, value: str, message: str) -> None:
    from engine.core import SpecError

    monkeypatch.setenv(variable, value)
    with pytest.raises(SpecError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}={value!r}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_worker_memory_limit_defaults_to_a_share_of_the_machine() -> None:
    from distributed import system

    from engine.execution.dask import WORKER_MEMORY_SHARE, worker_memory_limit

    assert worker_memory_limit(None, 4) == int(system.MEMORY_LIMIT * WORKER_MEMORY_SHARE / 4)
    assert worker_memory_limit("2GiB", 4) == 2 * 2**30


# -- a real run ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_endpoint_serves_the_documented_metrics_during_a_run(
    prefect_api, ire_env, dask_address, monkeypatch
) -> None:
    from flows.refine import InProcessRun, run_refine

    port = free_port()
    monkeypatch.setenv("IRE_METRICS_PORT", str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    scraped: dict[str, Any] = {}

    def scrape_at_cycle_3(job: Any, record: Any) -> None:
        if record.cycle == 3:  # listeners run before the observers: the metrics have cycles 1-2
            scraped.update(samples(httpx.get(url, timeout=10).text))

    spec = JobSpec.parse(
        {
            "problem": "tests.problems_for_tests:Slow",
            "problem_params": {"ms": 10.0},
            "strategy": "random",
            "batch_size": 8,
            "max_cycles": 5,
            "cache": "on",
        }
    )
    result = run_refine(
        InProcessRun(listeners=(scrape_at_cycle_3,)), spec=spec, job_id="metrics-1", dask_address=dask_address
    )
    assert result.status == "completed" and result.cycles == 5

    for name, (kind, _, _) in METRICS.items():
        names = [f"{name}_bucket", f"{name}_count", f"{name}_sum"] if kind == "histogram" else [name]
        for sample_name in names:
            assert sample_name in scraped, f"{sample_name} not served"
            assert all(s.labels["job_id"] == "metrics-1" for s in scraped[sample_name])
    assert value(scraped, "irefine_evaluations_total", status="ok") == 16
    assert value(scraped, "irefine_evaluations_total", status="failed") == 0
    assert (
        value(scraped, "irefine_cache_misses_total") == 16 and value(scraped, "irefine_cache_hits_total") == 0
    )
    assert (
        value(scraped, "irefine_cycles_total") == 2
        and value(scraped, "irefine_cycle_duration_seconds_count") == 2
    )
    assert value(scraped, "irefine_evaluation_duration_seconds_count") == 16
    assert 0.16 <= value(scraped, "irefine_evaluation_duration_seconds_sum") < 16 * 1.0
    assert value(scraped, "irefine_evaluations_per_second") > 0
    assert 0 <= value(scraped, "irefine_queue_wait_seconds") < 60
    assert value(scraped, "irefine_process_resident_memory_bytes") > 20 * 2**20
    assert value(scraped, "irefine_process_cpu_percent") >= 0
    assert value(scraped, "irefine_workers") == 2
    assert len(scraped["irefine_worker_memory_bytes"]) == 2
    assert all(s.value > 20 * 2**20 for s in scraped["irefine_worker_memory_bytes"])
    assert {s.labels["worker"] for s in scraped["irefine_worker_cpu_percent"]} == {
        s.labels["worker"] for s in scraped["irefine_worker_memory_bytes"]
    }
    assert value(scraped, "irefine_resource_sample_errors_total") == 0

    store = JobStore.from_settings(load_settings())
    try:
        cycles = store.cycles("metrics-1")
    finally:
        store.close()
    assert value(scraped, "irefine_best_score") == cycles[1].best_score
    with pytest.raises(httpx.ConnectError):  # the endpoint lives as long as the run
        httpx.get(url, timeout=5)

    # Kept per cycle in the store, in the cycle's own transaction.
    for cycle in cycles:
        assert cycle.eval_p50 is not None and 0.009 < cycle.eval_p50 <= cycle.eval_p95 <= cycle.eval_max < 5
        assert cycle.process_cpu_percent is not None and cycle.process_cpu_percent >= 0
        assert cycle.process_rss_bytes is not None and cycle.process_rss_bytes > 20 * 2**20
    last = cycles[-1]
    assert last.worker_memory_total_bytes is not None and last.worker_memory_max_bytes is not None
    assert last.worker_memory_total_bytes >= last.worker_memory_max_bytes > 20 * 2**20

    status = irefine("status", "metrics-1", "--json", env=ire_env)
    assert status.returncode == 0, status.stderr
    metrics = json.loads(status.stdout)["metrics"]
    assert metrics["cycle"] == 5 and metrics["duration_seconds"] == pytest.approx(last.duration)
    assert metrics["eval_p95_seconds"] == pytest.approx(last.eval_p95)
    assert metrics["evaluations_per_second"] == pytest.approx(8 / last.duration)
    assert metrics["worker_memory_total_bytes"] == last.worker_memory_total_bytes
    text = irefine("status", "metrics-1", env=ire_env)
    assert "last cycle: 5 took" in text.stdout and "evals/s" in text.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_json_logs_carry_job_cycle_and_flow_run_id(prefect_api, ire_env) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    env = {**ire_env, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"}
    out = irefine(
        "run", "--problem", "sphere", "--strategy", "random", "--batch-size", "4", "--max-cycles", "3",
        "--executor", "local", "--job-id", "json-logs", "--log-format", "json", "-q",
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        assert {"timestamp", "level", "logger", "message", "job_id", "cycle", "flow_run_id"} <= set(line)
    in_run = [line for line in lines if line["flow_run_id"]]
    assert in_run and all(line["job_id"] == "json-logs" for line in in_run)
    assert {line["cycle"] for line in in_run} >= {1, 2, 3}
    flow_run_id = in_run[0]["flow_run_id"]

    async def api_messages() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            return [log.message for log in logs]

    messages: list[str] = []
    for _ in range(60):  # run logs reach the server in batches
        messages = asyncio.run(api_messages())
        if any("cycle 3]" in m for m in messages):
            break
        time.sleep(0.5)
    assert any(m.startswith("[job json-logs cycle 2] ") for m in messages), messages
    assert all(m.startswith("[job json-logs") for m in messages), messages


@pytest.mark.slow  # three CLI start-ups
def test_bad_metrics_port_is_one_clear_line(ire_env) -> None:
    bad = irefine("run", "--problem", "sphere", env={**ire_env, "IRE_METRICS_PORT": "nine"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "IRE_METRICS_PORT='nine'" in bad.stderr
    flag = irefine("run", "--problem", "sphere", "--metrics-port", "70000", env=ire_env)
    assert flag.returncode == 2 and "--metrics-port" in flag.stderr and "65535" in flag.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = irefine("run", "--problem", "sphere", "--metrics-port", port, env=ire_env)
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1
    assert f"metrics port 127.0.0.1:{port}" in busy.stderr and "choose another --metrics-port" in busy.stderr
    assert not (Path(ire_env["IRE_HOME"]) / "irefine.db").exists()  # nothing written


# -- self-healing ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_leaking_memory_is_restarted_and_the_job_completes(tmp_path, monkeypatch) -> None:
    from engine.execution.dask import DaskExecutor
    from engine.runner import create_job, run_job

    monkeypatch.setenv("IRE_DASK_WORKER_MEMORY", "450MiB")
    marker = tmp_path / "leaked"
    executor = DaskExecutor.start(None, 2)
    store = JobStore(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        limits = {w["memory_limit"] for w in executor.client.scheduler_info(n_workers=-1)["workers"].values()}
        assert limits == {450 * 2**20}
        spec = JobSpec.parse(
            {
                "problem": "tests.problems_for_tests:Leaky",
                "problem_params": {"marker": str(marker)},
                "strategy": "random",
                "batch_size": 20,
                "max_cycles": 3,
                "shard_size": 5,
                "cache": "off",
            }
        )
        job = create_job(store, spec, "leaky")
        result = run_job(job, store, executor)
        assert result.status is JobStatus.COMPLETED and result.progress.evaluations == 60
        assert result.progress.failed == 0
        leaker = int(marker.read_text())
        executor.client.wait_for_workers(2, timeout=60)
        pids = set(executor.client.run(os.getpid).values())
        assert leaker not in pids and len(pids) == 2  # the nanny replaced the leaking worker
    finally:
        store.close()
        executor.close()
