"""What a job shows: its Prefect artifacts on a real API, `status --plot`, and `irefine top`."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.core import JobSpec
from engine.core.cycle import Progress
from engine.settings import load_settings
from engine.store import JobStatus, JobStore
from tests.test_cli import irefine

ROOT = Path(__file__).resolve().parents[1]


def read_artifacts(flow_run_id: Any) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    return asyncio.run(read())


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def spec(**overrides: Any) -> JobSpec:
    data = {"problem": "sphere", "problem_params": {"dim": 3}, "strategy": "random", "batch_size": 4,
            "max_evaluations": 24, "seed": 3}  # fmt: skip
    return JobSpec.parse({**data, **overrides})


# -- pure parts -----------------------------------------------------------------------------------


def test_artifact_keys_are_valid_stable_and_distinct() -> None:
    from flows.artifacts import artifact_keys

    plain = artifact_keys("20261127-080518-abc123")
    assert plain.progress == "irefine-progress-20261127-080518-abc123"
    assert plain == artifact_keys("20261127-080518-abc123")
    odd = [artifact_keys(job) for job in ("Run_1", "run-1", "run 1", "RUN.1", "__", "ü")]
    for keys in odd:
        for key in (keys.progress, keys.cycles, keys.summary):
            assert re.fullmatch(r"[a-z0-9-]+", key), key
    assert len({k.progress for k in odd}) == len(odd)


def test_budget_share_is_the_furthest_budget_capped_at_100() -> None:
    from flows.artifacts import budget_share

    progress = Progress(cycles=3, evaluations=40, elapsed_seconds=1.0)
    assert budget_share(spec(max_evaluations=100), progress) == 40.0
    assert budget_share(spec(max_evaluations=100, max_cycles=4), progress) == 75.0
    assert budget_share(spec(max_evaluations=None, max_seconds=2.0), progress) == 50.0
    assert budget_share(spec(max_evaluations=10), progress) == 100.0
    assert budget_share(spec(max_evaluations=None, deadline="2999-01-01T00:00:00Z"), progress) == 0.0


def test_the_svg_plot_holds_both_series_and_a_log_axis_when_scores_span_decades() -> None:
    from engine.core.cycle import CycleRecord
    from engine.observe.plot import convergence_series, convergence_svg

    cycles = [CycleRecord(i, 10, 0, 0, 10.0 ** (2 - i) * 1.5, 10.0 ** (2 - i), True, 0.1, 0.1)
              for i in range(1, 7)]  # fmt: skip
    series = convergence_series(cycles, job_id="j<1>", problem="sphere", strategy="cmaes")
    assert series.log_y and len(series.batch) == 6 and series.best[-1] == (60, 1e-4)
    svg = convergence_svg(series)
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "j&lt;1&gt;" in svg
    assert svg.count("<circle") == 6 + 1  # the cycle bests and the legend's marker
    assert ">0.001<" in svg and ">100<" in svg  # decade ticks
    flat = convergence_series(
        [CycleRecord(1, 5, 0, 0, -2.0, -2.0, True, 0.1, 0.1)], job_id="j", problem="p", strategy="s"
    )
    assert not flat.log_y and "<polyline" in convergence_svg(flat)
    assert "no scored cycle yet" in convergence_svg(
        convergence_series([], job_id="j", problem="p", strategy="s")
    )


# -- on a real Prefect API --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_leaves_progress_table_and_summary_on_the_flow_run(prefect_api, ire_env, monkeypatch) -> None:
    import flows.artifacts
    from flows.artifacts import TABLE_COLUMNS, artifact_keys
    from flows.refine import refine

    # Send the table and progress after every cycle: the periodic path, not only the final one.
    monkeypatch.setattr(flows.artifacts, "TABLE_INTERVAL_S", 0.0)
    monkeypatch.setattr(flows.artifacts, "PROGRESS_INTERVAL_S", 0.0)
    job_id = f"art-{uuid.uuid4().hex[:8]}"
    state = refine(spec=spec(), job_id=job_id, executor="local", return_state=True)
    assert state.is_completed() and state.result().cycles == 6
    flow_run_id = state.state_details.flow_run_id

    artifacts = {a.key: a for a in read_artifacts(flow_run_id)}
    keys = artifact_keys(job_id)
    assert set(artifacts) == {keys.progress, keys.cycles, keys.summary}  # one version each: updated

    progress = artifacts[keys.progress]
    assert progress.type == "progress" and progress.data == 100 and "completed" in progress.description

    table = artifacts[keys.cycles]
    rows = json.loads(table.data)
    assert table.type == "table" and [r["cycle"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == set(TABLE_COLUMNS) and sum(r["evaluations"] for r in rows) == 24
    store = JobStore.from_settings(load_settings())
    try:
        stored = store.cycles(job_id)
    finally:
        store.close()
    assert [r["best"] for r in rows] == [c.best_score for c in stored]

    summary = artifacts[keys.summary]
    assert summary.type == "markdown" and f"# Job `{job_id}`: completed" in summary.data
    encoded = re.search(r"!\[[^]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", summary.data)
    assert encoded is not None
    svg = base64.b64decode(encoded.group(1)).decode()
    assert svg.startswith("<svg") and job_id in svg and "<polyline" in svg


@pytest.mark.integration
@pytest.mark.slow
def test_a_resumed_job_tables_every_cycle_under_the_same_keys(prefect_api, ire_env) -> None:
    from engine.execution import InProcessExecutor
    from engine.runner import create_job, resume_job, run_job
    from flows.artifacts import artifact_keys
    from flows.refine import refine

    job_id = f"art-resume-{uuid.uuid4().hex[:8]}"
    store = JobStore.from_settings(load_settings())

    def stop_after_two(job: Any, record: Any) -> None:
        if record.cycle == 2:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(create_job(store, spec(), job_id), store, InProcessExecutor(), listeners=[stop_after_two])
        assert resume_job(store, job_id).progress.cycles == 2
    finally:
        store.close()

    state = refine(job_id=job_id, executor="local", return_state=True)
    assert state.is_completed()
    artifacts = {a.key: a for a in read_artifacts(state.state_details.flow_run_id)}
    keys = artifact_keys(job_id)
    assert [r["cycle"] for r in json.loads(artifacts[keys.cycles].data)] == [1, 2, 3, 4, 5, 6]
    assert artifacts[keys.progress].data == 100


# -- the terminal -----------------------------------------------------------------------------------


def finished_job(job_id: str) -> None:
    """A small job run to its end in this process, straight through the engine (no Prefect)."""
    from engine.execution import InProcessExecutor
    from engine.runner import create_job, run_job

    store = JobStore.from_settings(load_settings())
    try:
        run_job(create_job(store, spec(), job_id), store, InProcessExecutor())
    finally:
        store.close()


def test_status_plot_writes_a_png_and_refuses_a_bad_path(ire_env, tmp_path) -> None:
    finished_job("plot-1")
    target = tmp_path / "plot.png"
    out = irefine("status", "plot-1", "--plot", str(target), env=ire_env)
    assert out.returncode == 0, out.stderr
    assert png_size(target.read_bytes()) == (800, 400)
    assert str(target) in out.stdout

    out = irefine("status", "plot-1", "--json", "--plot", str(tmp_path / "json.png"), env=ire_env)
    assert out.returncode == 0 and json.loads(out.stdout)["job_id"] == "plot-1"
    assert png_size((tmp_path / "json.png").read_bytes()) == (800, 400)

    for bad in (tmp_path / "missing" / "plot.png", tmp_path / "plot.jpg", tmp_path):
        out = irefine("status", "plot-1", "--plot", str(bad), env=ire_env)
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1 and "--plot" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ire-home", "json.png", "plot.png"]


@dataclass(frozen=True)
class Finding:
    cycle: int
    kind: str
    message: str
    evidence: dict[str, Any]


def test_top_once_shows_the_running_jobs_only(ire_env) -> None:
    finished_job("top-running")
    finished_job("top-done")
    store = JobStore.from_settings(load_settings())
    try:
        store.set_status("top-running", JobStatus.RUNNING)  # as a job whose process is mid-run
        store.add_anomalies("top-running", [Finding(2, "stall", "no improvement", {}),
                                            Finding(3, "slow_cycle", "slow", {})])  # fmt: skip
        job = store.get_job("top-running")
    finally:
        store.close()
    out = irefine("top", "--once", env=ire_env)
    assert out.returncode == 0, out.stderr
    assert "1 running job" in out.stdout and "top-done" not in out.stdout
    line = next(line for line in out.stdout.splitlines() if "top-running" in line)
    cells = line.split()
    assert cells[:3] == ["top-running", "running", str(job.cycles)]
    assert cells[3] == f"{job.best_score:.6g}" and float(cells[4].replace(",", "")) > 0
    assert cells[5] == str(job.evaluations) and cells[6] == "2"


def test_top_throughput_uses_the_wall_clock_between_recent_cycle_ends() -> None:
    from datetime import UTC, datetime, timedelta

    from engine.store import StoredCycle
    from irefine.top import throughput

    start = datetime(2026, 1, 1, tzinfo=UTC)

    def cycle(i: int, evaluations: int, duration: float) -> StoredCycle:
        finished = start + timedelta(seconds=2 * i)
        return StoredCycle(
            cycle=i, evaluations=evaluations, failed=0, cached=0, batch_best_score=None, best_score=None,
            improved=False, duration=duration, eval_seconds=duration, finished_at=finished, metrics=None,
        )  # fmt: skip

    assert throughput([]) is None
    assert throughput([cycle(1, 10, 0.5)]) == 20.0
    cycles = [cycle(i, 100 if i < 4 else 10, 1.0) for i in range(1, 10)]
    assert throughput(cycles, recent=5) == 50 / 10  # the last five cycles' 10 evaluations each, 2 s apart


def test_top_refreshes_until_ctrl_c_then_exits_0(ire_env) -> None:
    finished_job("top-live")
    top = subprocess.Popen(
        [sys.executable, "-m", "irefine", "top"],
        env=ire_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A child of a non-interactive shell may inherit SIGINT ignored; Ctrl-C must reach this one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(4)  # start-up, then a few refreshes
    assert top.poll() is None, top.communicate()
    top.send_signal(signal.SIGINT)
    out, err = top.communicate(timeout=30)
    assert top.returncode == 0, err
    assert "irefine top: 0 running jobs" in out and err == ""
