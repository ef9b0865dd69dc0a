"""The Prefect server settings we recommend for refinement workloads (deployments/server.py)."""

from __future__ import annotations

import httpx
import pytest

from deployments.server import SERVER_SETTINGS, apply_server_settings


def test_apply_server_settings_keeps_what_the_operator_set() -> None:
    environ = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "7", "OTHER": "x"}
    applied = apply_server_settings(environ)
    assert "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE" not in applied
    assert environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "7"
    assert environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"] == "1"
    assert environ["OTHER"] == "x"
    assert apply_server_settings(environ) == {}  # a second call changes nothing


@pytest.mark.integration
def test_a_server_started_with_them_runs_with_them(prefect_server) -> None:
    """The test server (like any `prefect server start` given this environment) reports them."""
    settings = httpx.get(f"{prefect_server.url}/admin/settings", timeout=10).json()
    recorder = settings["server"]["services"]["task_run_recorder"]
    assert recorder["batch_size"] == int(
        SERVER_SETTINGS["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"]
    )
    assert recorder["flush_interval"] == float(
        SERVER_SETTINGS["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"]
    )
