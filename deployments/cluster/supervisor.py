"""A supervisor for the cluster's Dask: one scheduler on a fixed port and N workers with nannies,
each in its own process group; whichever dies is started again (the scheduler on the same port, so
clients and workers reconnect to the same address). The pids go to ``dask.json`` for
``irefine cluster status``.

    python -m deployments.cluster.supervisor FOLDER SCHEDULER_PORT WORKERS

SIGTERM stops the children, then the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from deployments.cluster.procs import alive, reap, spawn, stop_group

CHECK_SECONDS = 0.5


def _commands(port: int, workers: int) -> dict[str, list[str]]:
    address = f"tcp://127.0.0.1:{port}"
    run = [sys.executable, "-m"]
    commands = {
        "dask-scheduler": [*run, "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                           "--port", str(port), "--dashboard-address", ":0"],
    }  # fmt: skip
    for n in range(workers):
        commands[f"dask-worker-{n}"] = [
            *run, "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
            "--name", f"dask-worker-{n}", "--host", "127.0.0.1", "--dashboard-address", ":0",
            "--death-timeout", "600",
        ]  # fmt: skip
    return commands


def supervise(folder: Path, port: int, workers: int) -> None:
    """Run until SIGTERM, restarting dead children; record their pids and restarts."""
    commands = _commands(port, workers)
    pids: dict[str, int] = {}
    restarts = dict.fromkeys(commands, 0)
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    state_file = folder / "dask.json"
    while not stopping:
        reap()
        changed = False
        for name, command in commands.items():
            if not alive(pids.get(name)):
                if name in pids:
                    restarts[name] += 1
                pids[name] = spawn(command, log=folder / "logs" / f"{name}.log", env=os.environ)
                changed = True
        if changed:
            state = {"port": port, "pids": pids, "restarts": restarts, "at": time.time()}
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(state_file)
        time.sleep(CHECK_SECONDS)
    for pid in pids.values():
        stop_group(pid, timeout=10)


if __name__ == "__main__":
    supervise(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
