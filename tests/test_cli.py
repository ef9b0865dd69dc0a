"""The irefine CLI as a user runs it: subprocesses, real store, real Prefect server, real Dask."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
IREFINE = [sys.executable, "-m", "irefine"]


def irefine(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IREFINE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def job_rows(env: dict[str, str]) -> list[tuple]:
    db = Path(env["IRE_HOME"]) / "irefine.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("select id, status, cycles, evaluations from jobs order by id").fetchall()
    except sqlite3.OperationalError as exc:  # the run has created the file but not yet its tables
        if "no such table" in str(exc):
            return []
        raise


# -- help and listings (fast, no Prefect) ---------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["resume"],
        ["status"],
        ["list"],
        ["problems"],
        ["strategies"],
        ["cache"],
        ["cache", "stats"],
        ["cache", "clear"],
        ["setup"],
    ],
)
def test_every_command_has_help(command: list[str], ire_env) -> None:
    out = irefine(*command, "--help", env=ire_env)
    assert out.returncode == 0 and "usage: irefine" in out.stdout


def test_problems_and_strategies_are_listed(ire_env) -> None:
    problems = irefine("problems", env=ire_env).stdout
    for name in ("sphere", "rosenbrock", "rastrigin", "ackley", "gradient_boosting", "random_forest", "svc"):
        assert name in problems
    strategies = irefine("strategies", env=ire_env).stdout
    for name in ("random", "cmaes", "tpe"):
        assert name in strategies
    assert "no jobs yet" in irefine("list", env=ire_env).stdout


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------

BAD_INPUTS = [
    (["run", "--problem", "nosuch"], "unknown problem"),
    (["run", "--problem", "sphere", "--strategy", "nosuch"], "unknown strategy"),
    (["run", "--problem", "sphere", "--problem-param", "dim=abc"], "dim"),
    (["run", "--problem", "sphere", "--problem-param", "dim=0"], "dim"),
    (["run", "--problem", "sphere", "--problem-param", "nodim=3"], "nodim"),
    (["run", "--problem", "sphere", "--problem-param", "dim"], "KEY=VALUE"),
    (["run", "--problem", "sphere", "--strategy-param", "sigma0=abc"], "sigma0"),
    (["run", "--problem", "sphere", "--batch-size", "0"], "batch_size"),
    (["run", "--problem", "sphere", "--max-failure-share", "2"], "max_failure_share"),
    (["run", "--problem", "nosuchmodule:Thing"], "nosuchmodule"),
    (["run"], "no problem given"),
    (["run", "missing.toml"], "does not exist"),
    (["resume", "nosuchjob"], "no job 'nosuchjob'"),
    (["status", "nosuchjob"], "no job 'nosuchjob'"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) or "empty" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args: list[str], needle: str, ire_env) -> None:
    before = job_rows(ire_env)
    out = irefine(*args, env=ire_env, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert job_rows(ire_env) == before


def test_malformed_spec_file(tmp_path: Path, ire_env) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("problem = 'sphere'\nbatch_size = = 3\n")
    out = irefine("run", str(bad), env=ire_env)
    assert (
        out.returncode == 2 and "not valid TOML" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    )
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("problem = 'sphere'\nbatch_sise = 3\n")
    out = irefine("run", str(wrong), env=ire_env)
    assert out.returncode == 2 and "batch_sise" in out.stderr


# -- real runs through Prefect and Dask --------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_run_status_list_and_duplicate_id(tmp_path: Path, prefect_api, ire_env) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(
        "problem = 'rosenbrock'\nstrategy = 'cmaes'\nbatch_size = 12\nmax_evaluations = 600\n"
        "[problem_params]\ndim = 3\n"
    )
    out = irefine("run", str(spec), "--seed", "5", "--job-id", "cli-1", env=ire_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed" in out.stdout and "best score" in out.stdout and "max evaluations" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr and "CancelledError" not in out.stdout + out.stderr

    status = json.loads(irefine("status", "cli-1", "--json", env=ire_env).stdout)
    for key in (
        "job_id",
        "status",
        "cycles",
        "evaluations",
        "failed_evaluations",
        "best_score",
        "best_candidate",
        "stop_reason",
    ):
        assert key in status
    assert status["status"] == "completed" and status["evaluations"] == 600 and status["cycles"] == 50
    assert set(status["best_candidate"]) == {"x0", "x1", "x2"}
    assert status["spec"]["seed"] == 5  # the flag overrode the file's default

    assert "cli-1" in irefine("list", env=ire_env).stdout
    before = job_rows(ire_env)
    dup = irefine("run", "--problem", "sphere", "--job-id", "cli-1", env=ire_env)
    assert dup.returncode == 2 and "already exists" in dup.stderr and job_rows(ire_env) == before


@pytest.mark.integration
@pytest.mark.slow
def test_failing_job_exits_1(prefect_api, ire_env) -> None:
    out = irefine(
        "run",
        "--problem",
        "tests.problems_for_tests:Flaky",
        "--problem-param",
        "fail_every=1",
        "--strategy",
        "random",
        "--batch-size",
        "8",
        "--job-id",
        "cli-fail",
        "--executor",
        "local",
        env=ire_env,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "max_failure_share" in out.stdout
    status = json.loads(irefine("status", "cli-fail", "--json", env=ire_env).stdout)
    assert status["status"] == "failed" and status["failed_evaluations"] == 8
    # The reason once, and no traceback, on the terminal; Prefect's run log keeps the traceback.
    terminal = out.stdout + out.stderr
    assert terminal.count("max_failure_share") == 1, terminal
    assert "Traceback" not in terminal and "Encountered exception" not in terminal, terminal
    links = re.findall(r"Prefect UI: (\S+)/runs/flow-run/([0-9a-f-]{36})", out.stdout)
    assert [url for url, _ in links] == [prefect_api.removesuffix("/api")], out.stdout
    assert "irefine status cli-fail" in out.stdout
    logs = run_log_text(links[0][1], "Encountered exception during execution")
    assert "Traceback" in logs and "JobFailedError: cycle 1: 8 of 8 evaluations failed" in logs, logs


def run_log_text(flow_run_id: str, expected: str, timeout: float = 60) -> str:
    """The Prefect run logs of a flow run, read from the API once ``expected`` is in them."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if expected in text or time.monotonic() > deadline:
                return text
            time.sleep(0.5)


def _wait_for_cycles(
    env: dict[str, str], job_id: str, cycles: int, proc: subprocess.Popen, limit: float
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        rows = {r[0]: r for r in job_rows(env)}
        if job_id in rows and rows[job_id][2] >= cycles:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach cycle {cycles} in {limit} s")


def kill_at_cycle_5_then_resume(
    ire_env: dict[str, str], run_args: list[str], log: Path
) -> tuple[dict[str, tuple], int, dict[str, Any], dict[str, Any]]:
    """Run job ``killed`` with ``run_args``, kill -9 its process group a moment after its fifth
    committed cycle, check it was left running, resume it, and return the job rows at the kill,
    the evaluations ``log`` held then, and the status of the jobs ``whole`` and ``killed``."""
    proc = subprocess.Popen(
        [*IREFINE, "run", *run_args, "--job-id", "killed"],
        env=ire_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for_cycles(ire_env, "killed", 5, proc, limit=180)
        time.sleep(0.15)  # into the next cycles: some of their evaluations have finished
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask workers, no clean-up
        proc.communicate()
    rows = {r[0]: r for r in job_rows(ire_env)}
    assert rows["killed"][1] == "running" and 5 <= rows["killed"][2] < 20
    done_before = len(log.read_text().splitlines())
    resumed = irefine("resume", "killed", env=ire_env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    whole = json.loads(irefine("status", "whole", "--json", env=ire_env).stdout)
    killed = json.loads(irefine("status", "killed", "--json", env=ire_env).stdout)
    return rows, done_before, whole, killed


def killed_run_ends_like_a_whole_run(
    ire_env: dict[str, str], tmp_path: Path, strategy: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run job ``whole`` with ``strategy`` uninterrupted, and job ``killed`` with the same spec
    killed -9 after its fifth cycle and resumed; check the resumed job ends like the whole one and
    nothing that finished before the kill was evaluated again (each candidate ran exactly once, the
    batch in flight included); return the status of both."""

    def args(log: Path) -> list[str]:
        return ["--problem", "tests.problems_for_tests:Logged", "--problem-param", f"log={log}",
                "--problem-param", "ms=60", "--strategy", strategy, "--batch-size", "8",
                "--max-evaluations", "160", "--seed", "11"]  # fmt: skip

    whole_env = {**ire_env, "IRE_CACHE_NAMESPACE": "whole"}  # its own cache entries
    full = irefine("run", *args(tmp_path / "whole.log"), "--job-id", "whole", env=whole_env)
    assert full.returncode == 0, full.stdout + full.stderr

    log = tmp_path / "killed.log"
    rows, done_before, whole, killed = kill_at_cycle_5_then_resume(ire_env, args(log), log)
    assert killed["status"] == "completed"
    assert killed["evaluations"] == whole["evaluations"] == 160
    assert killed["best_score"] == whole["best_score"]
    assert killed["best_candidate"] == whole["best_candidate"]
    evaluated = log.read_text().splitlines()
    assert len(evaluated) == len(set(evaluated)) == 160 and done_before > 5 * 8
    assert killed["cache_hits"] >= done_before - rows["killed"][3]
    return whole, killed


@pytest.mark.integration
@pytest.mark.slow
def test_resume_after_kill_9_ends_like_an_uninterrupted_run(prefect_api, ire_env, tmp_path: Path) -> None:
    killed_run_ends_like_a_whole_run(ire_env, tmp_path, "cmaes")


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_job_resumes(prefect_api, ire_env) -> None:
    proc = subprocess.Popen(
        [
            *IREFINE,
            "run",
            "--problem",
            "tests.problems_for_tests:Slow",
            "--strategy",
            "random",
            "--batch-size",
            "4",
            "--max-evaluations",
            "400",
            "--job-id",
            "ctrlc",
            "--executor",
            "local",
        ],
        env=ire_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_cycles(ire_env, "ctrlc", 2, proc, limit=180)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "irefine resume ctrlc" in out
    status = json.loads(irefine("status", "ctrlc", "--json", env=ire_env).stdout)
    assert status["status"] == "interrupted"


@pytest.mark.integration
@pytest.mark.slow
def test_cache_stats_and_clear(prefect_api, ire_env) -> None:
    empty = json.loads(irefine("cache", "stats", "--json", env=ire_env).stdout)
    assert empty["entries"] == 0 and empty["backend"] == "embedded" and empty["hit_rate"] is None
    args = ["--problem", "tests.problems_for_tests:Slow", "--problem-param", "ms=2", "--strategy", "random",
            "--batch-size", "10", "--max-evaluations", "30", "--executor", "local"]  # fmt: skip
    assert irefine("run", *args, "--job-id", "c1", env=ire_env).returncode == 0
    out = irefine("run", *args, "--job-id", "c2", env=ire_env)
    assert out.returncode == 0 and "cache hits 30, misses 0" in out.stdout
    status = json.loads(irefine("status", "c2", "--json", env=ire_env).stdout)
    assert status["cache_hits"] == 30 and status["cache_misses"] == 0
    stats = json.loads(irefine("cache", "stats", "--json", env=ire_env).stdout)
    assert (
        stats["entries"] == 30 and stats["hits"] == 30 and stats["misses"] == 30 and stats["hit_rate"] == 0.5
    )
    assert irefine("cache", "clear", "--problem", "sphere", env=ire_env).stdout.startswith("removed 0 ")
    cleared = irefine("cache", "clear", "--problem", "tests.problems_for_tests:Slow", env=ire_env)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 30 ")
    assert json.loads(irefine("cache", "stats", "--json", env=ire_env).stdout)["entries"] == 0
    bad = irefine("cache", "clear", "--version", "3", env=ire_env)
    assert bad.returncode == 2 and "needs a problem" in bad.stderr


def test_the_console_drops_only_run_reports_of_engine_named_failures() -> None:
    import logging

    from engine.core import JobFailedError, SpecError, TransientError
    from engine.observe.logs import EngineFailureFilter

    def report(logger: str, error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, "Encountered exception", (), exc_info)

    console = EngineFailureFilter()
    assert not console.filter(report("prefect.flow_runs", JobFailedError("cycle 1: 8 of 8 failed")))
    assert not console.filter(report("prefect.task_runs", SpecError("unknown problem")))
    assert console.filter(report("prefect.flow_runs", TransientError("lost a worker")))  # traceback kept
    assert console.filter(report("prefect.flow_runs", ZeroDivisionError("a bug")))
    assert console.filter(report("irefine", JobFailedError("not a run logger")))
