"""The project as a user deploys it, for tests and benchmarks: `irefine setup`, `prefect deploy`, and
`irefine worker` process workers, each a subprocess pointed at a given Prefect server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_env(api_url: str, **extra: str) -> dict[str, str]:
    """This process's environment pointed at ``api_url``, with ``extra`` on top."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "IRE_PROJECT_DIR": str(ROOT),
        # Deployment runs import module:attr problems only from allow-listed modules: the tests'.
        "IRE_PROBLEM_MODULES": os.environ.get("IRE_PROBLEM_MODULES", "tests"),
        **extra,
    }


def irefine(api_url: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``irefine ARGS`` against ``api_url`` from the project directory."""
    return subprocess.run(
        [sys.executable, "-m", "irefine", *args],
        env=project_env(api_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def deploy(api_url: str, *names: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``prefect --no-prompt deploy`` of prefect.yaml's deployments ``names`` (all when none given).

    Raises with the command's output when it fails.
    """
    which = [arg for name in names for arg in ("--name", name)] or ["--all"]
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *which],
        env=project_env(api_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


class ProcessWorker:
    """``irefine worker --pool POOL --limit N`` in its own process group (its flow runs are child
    processes: :meth:`stop` ends them too). Polls every ``poll_seconds``; logs at ``log_level``
    (DEBUG: each poll's start and end, for tests/queue_scenario.py)."""

    def __init__(
        self,
        api_url: str,
        pool: str,
        *,
        limit: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        poll_seconds: float = 1.0,
        name: str | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "irefine", "worker", "--pool", pool, "--limit", str(limit)]
        command += ["--log-level", log_level]
        if name:
            command += ["--name", name]
        self.process = subprocess.Popen(
            command,
            env=project_env(
                api_url,
                PREFECT_WORKER_QUERY_SECONDS=str(poll_seconds),
                PREFECT_WORKER_PREFETCH_SECONDS=str(max(1, int(poll_seconds))),
                **(env or {}),
            ),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, timeout: float = 20) -> None:
        """Stop the worker and every flow-run process it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        self._log.close()

    def __enter__(self) -> ProcessWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
