"""``irefine server start | stop | status`` and the Prefect API ``irefine run`` picks, as a user runs
them: CLI subprocesses, a real ``prefect server start`` on SQLite, real runs kept on it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from irefine.server import KEEP_RUNS_HINT, ApiChoice, api_for_run
from tests.prefect_server import free_port
from tests.test_cli import IREFINE, ROOT, irefine, job_rows

SMALL_JOB = ["--problem", "sphere", "--problem-param", "dim=3", "--strategy", "random",
             "--batch-size", "4", "--max-cycles", "2", "--executor", "local"]  # fmt: skip


@pytest.fixture
def server_env(ire_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment with no Prefect API set: what a user has after a fresh clone."""
    env = {k: v for k, v in ire_env.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env["PREFECT_HOME"] = str(Path(env["IRE_HOME"]).parent / "prefect-home")
    return env


def status(env: dict[str, str]) -> tuple[int, dict]:
    out = irefine("server", "status", "--json", env=env)
    return out.returncode, json.loads(out.stdout)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_start_keep_runs_status_stop(server_env: dict[str, str]) -> None:
    port = free_port()
    started = irefine("server", "start", "--port", str(port), env=server_env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        code, running = status(server_env)
        assert code == 0 and running["healthy"] and running["api_url"] == f"http://127.0.0.1:{port}/api"
        server_processes = [psutil.Process(running["pid"])]
        server_processes += server_processes[0].children(recursive=True)
        assert (Path(server_env["IRE_HOME"]) / "server" / "prefect" / "prefect.db").exists()
        again = irefine("server", "start", env=server_env)  # idempotent: the same server
        assert again.returncode == 0 and "running at" in again.stdout
        assert status(server_env)[1]["pid"] == running["pid"]
        text = irefine("server", "status", env=server_env).stdout
        assert f"http://127.0.0.1:{port}" in text and str(running["pid"]) in text and "health: ok" in text

        run = irefine("run", *SMALL_JOB, "--job-id", "kept", env=server_env, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        assert KEEP_RUNS_HINT not in run.stderr and "Traceback" not in run.stdout + run.stderr
        link = rf"Prefect UI: http://127\.0\.0\.1:{port}/runs/flow-run/([0-9a-f-]{{36}})"
        ids = re.findall(link, run.stdout)
        assert len(ids) == 1, run.stdout
        assert "irefine status kept" in run.stdout and "irefine top" in run.stdout
        flow_run = httpx.get(f"{running['api_url']}/flow_runs/{ids[0]}", timeout=10).json()
        assert flow_run["state"]["type"] == "COMPLETED" and flow_run["parameters"]["job_id"] == "kept"
        server_processes.append(psutil.Process(running["launcher_pid"]))
        check_the_launcher(server_env, Path(server_env["IRE_HOME"]) / "server" / "launcher.log")
    finally:
        stopped = irefine("server", "stop", env=server_env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not [p for p in server_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    code, after = status(server_env)
    assert code == 1 and not after["running"]
    with socket.socket() as probe:  # the port is free again (closed connections may linger)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    assert "no local Prefect server" in irefine("server", "stop", env=server_env).stdout


def best_of(env: dict[str, str], job_id: str) -> tuple[float, dict]:
    report = json.loads(irefine("status", job_id, "--json", env=env).stdout)
    return report["best_score"], report["best_candidate"]


def check_the_launcher(env: dict[str, str], log: Path) -> None:
    """The launcher ran the run above; a warm run equals a cold one; Ctrl-C reaches the run; a
    changed source file makes it decline (the run starts cold) and start again."""
    assert "ran run as pid" in log.read_text() and "exited 0" in log.read_text()
    seeded = [*SMALL_JOB, "--seed", "11"]
    warm = irefine("run", *seeded, "--job-id", "warm", "-q", env=env, timeout=600)
    cold = irefine("run", *seeded, "--job-id", "cold", "-q", env={**env, "IRE_LAUNCHER": "off"}, timeout=600)
    assert warm.returncode == cold.returncode == 0, warm.stderr + cold.stderr
    assert log.read_text().count("ran run as pid") == 2  # the cold one did not ask it
    assert best_of(env, "warm") == best_of(env, "cold")

    slow = ["--problem", "sphere", "--problem-param", "dim=3", "--problem-param", "cost_ms=100",
            "--strategy", "random", "--batch-size", "2", "--max-cycles", "500",
            "--executor", "local"]  # fmt: skip
    proc = subprocess.Popen(
        [*IREFINE, "run", *slow, "--job-id", "interrupted"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(r[0] == "interrupted" and r[2] >= 1 for r in job_rows(env)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    child = int(re.findall(r"ran run as pid (\d+)", log.read_text())[-1])
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "irefine resume interrupted" in out
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE

    touched = ROOT / "engine" / "runner.py"
    os.utime(touched)  # as an edit would: the launcher's imports are out of date
    fresh = irefine("run", *seeded, "--job-id", "after-edit", "-q", env=env, timeout=600)
    assert fresh.returncode == 0 and best_of(env, "after-edit") == best_of(env, "cold")
    text = log.read_text()
    assert "declined run: the project's source changed" in text
    deadline = time.monotonic() + 180
    while log.read_text().count("listening on") < 2:  # it starts again with fresh imports
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)


def test_a_port_in_use_is_bad_input_and_starts_nothing(server_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = irefine("server", "start", "--port", str(port), env=server_env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "choose another --port" in out.stderr
    assert not (Path(server_env["IRE_HOME"]) / "server" / "server.json").exists()
    code, after = status(server_env)
    assert code == 1 and not after["running"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_without_a_server_a_run_uses_a_temporary_api_and_says_how_to_keep_runs(
    server_env: dict[str, str],
) -> None:
    before = {p.pid for p in psutil.process_iter()}
    # A fresh PREFECT_HOME: the temporary API first creates and migrates its database.
    env = {**server_env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    run = irefine("run", *SMALL_JOB, "--job-id", "temporary", env=env, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr.count(KEEP_RUNS_HINT) == 1 and "irefine server start" in KEEP_RUNS_HINT
    assert "Prefect UI:" not in run.stdout and "irefine status temporary" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr and "completed" in run.stdout
    assert not _temporary_apis(env, before)  # the temporary API stopped with the run


def _temporary_apis(env: dict[str, str], before: set[int]) -> list[list[str]]:
    """The temporary API processes started since ``before`` by runs of ``env``'s IRE_HOME."""
    uvicorn = [sys.executable, "-m", "uvicorn"]
    return [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline", "environ"])
        if p.pid not in before
        and (p.info["cmdline"] or [])[:3] == uvicorn
        and (p.info["environ"] or {}).get("IRE_HOME") == env["IRE_HOME"]  # this run's, not another's
    ]


def test_a_refused_run_stops_its_temporary_api_and_writes_nothing(server_env: dict[str, str]) -> None:
    """The temporary API starts before the input is checked (it takes seconds): a run refused for
    its input still exits 2 with one line, leaves no process behind and nothing under IRE_HOME."""
    before = {p.pid for p in psutil.process_iter()}
    out = irefine("run", "--problem", "sphere", "--batch-size", "0", env=server_env, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "batch_size" in out.stderr
    assert not _temporary_apis(server_env, before)
    assert not Path(server_env["IRE_HOME"]).exists() or not any(Path(server_env["IRE_HOME"]).iterdir())


def test_the_api_choice_follows_the_environment_the_profile_then_the_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRE_HOME", str(tmp_path / "ire"))
    env = {"PREFECT_API_URL": "http://127.0.0.1:1/api", "PREFECT_HOME": str(tmp_path / "prefect")}
    assert api_for_run(env) == ApiChoice("environment", "http://127.0.0.1:1/api")
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://127.0.0.1:2/api"\n'
    )
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    assert api_for_run(env) == ApiChoice("environment", "http://127.0.0.1:2/api")
    assert "PREFECT_API_URL" not in env  # Prefect reads the profile itself


def test_server_commands_have_help(server_env: dict[str, str]) -> None:
    for command in (["server"], ["server", "start"], ["server", "stop"], ["server", "status"]):
        out = irefine(*command, "--help", env=server_env)
        assert out.returncode == 0 and "usage: irefine server" in out.stdout


def test_a_recorded_server_that_is_gone_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale record (the machine rebooted) is ignored: the run falls back to a temporary API."""
    home = tmp_path / "ire"
    (home / "server").mkdir(parents=True)
    port = free_port()
    record = {"pid": 999_999, "port": port, "api_url": f"http://127.0.0.1:{port}/api", "started_at": "x"}
    (home / "server" / "server.json").write_text(json.dumps(record))
    monkeypatch.setenv("IRE_HOME", str(home))
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PATH": "/usr/bin"}
    choice = api_for_run(env)
    try:
        assert choice.source == "temporary" and choice.api_url != record["api_url"]
        assert env["PREFECT_API_URL"] == choice.api_url and isinstance(choice.process, subprocess.Popen)
    finally:
        choice.close()
    assert choice.process is None
