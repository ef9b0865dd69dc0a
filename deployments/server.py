"""Prefect server settings for refinement workloads.

A refinement job sends the server a steady stream of small task runs: three stages a cycle, each
reported as three state events (Pending, Running, Completed). Prefect's task-run recorder writes
them with a batch size of 1 by default: one transaction, and one freshly compiled
``INSERT ... ON CONFLICT`` statement, per event. On the 2-core machine of ``bench/overhead.py``
that cost the server 140 ms of CPU for each 2-second cycle of 200 evaluations of 20 ms, taken
from the Dask workers on the same cores; batched as below it costs 50 ms
(``bench/overhead.py`` reports ``server_excess_cpu_ms_per_cycle``). Task-run states then reach
the UI up to ``FLUSH_INTERVAL`` seconds later; flow-run states, events and automations are not
delayed.

Set them in the environment of ``prefect server start`` (the AKS manifests, a systemd unit, ...).
``irefine`` sets them by default for the ephemeral server it starts when no ``PREFECT_API_URL``
is set, and the test and benchmark servers use them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

SERVER_SETTINGS: Mapping[str, str] = {
    # Write task-run events in batches of up to 100, at least once a second.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def apply_server_settings(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set :data:`SERVER_SETTINGS` in ``environ`` where the operator has not set them; returns
    the ones it set."""
    applied = {key: value for key, value in SERVER_SETTINGS.items() if key not in environ}
    environ.update(applied)
    return applied
