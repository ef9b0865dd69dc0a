"""``irefine server start | stop | status``: a local Prefect server that keeps every run for the UI,
and which Prefect API ``irefine run`` uses.

The server is ``prefect server start`` on 127.0.0.1 in its own session, with its state under
``IRE_HOME/server``: a PREFECT_HOME of its own (``prefect/``, the SQLite database in it), the log
``server.log`` and the record ``server.json`` (pid, port, API address) that ``irefine run`` reads.

``irefine run`` takes, in this order: ``PREFECT_API_URL`` (environment or Prefect profile), the
recorded local server if it answers, else a temporary API of its own that forgets the run when the
run ends; it then says once, on stderr, how to keep runs. The temporary API is the uvicorn process
Prefect's ephemeral mode would start, but launched before this process imports Prefect, so the two
starts overlap (Prefect starts its own only when the flow first calls the API).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from irefine.errors import EXIT_FAILED, EXIT_OK, BadInput

DEFAULT_PORT = 4200
START_TIMEOUT_SECONDS = 600.0
"""The first start creates and migrates the database: 20-60 s on a 2-core machine, minutes when
other work keeps its cores busy."""
STOP_TIMEOUT_SECONDS = 20.0
LAUNCHER_START_SECONDS = 120.0

KEEP_RUNS_HINT = (
    "irefine: this run uses a temporary Prefect API that forgets it at exit; to keep runs and see "
    "them in the Prefect UI, start a local server first: irefine server start"
)


@dataclass(frozen=True)
class ServerRecord:
    """A local server as ``irefine server start`` recorded it in ``IRE_HOME/server/server.json``."""

    pid: int
    port: int
    api_url: str
    started_at: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


@dataclass(frozen=True)
class ServerPaths:
    """Where a local server keeps its state."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / "server.json"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def database(self) -> Path:
        return self.prefect_home / "prefect.db"

    @classmethod
    def of(cls, ire_home: Path) -> ServerPaths:
        return cls(ire_home / "server")


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM ``process`` and wait for it; SIGKILL it if it has not ended after ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _ire_home() -> Path:
    from engine.core import SpecError
    from engine.settings import load_settings

    try:
        return load_settings().home
    except SpecError as exc:
        raise BadInput(str(exc)) from None


def read_record(paths: ServerPaths) -> ServerRecord | None:
    """The recorded server (None if none is recorded or the record is unreadable)."""
    try:
        return ServerRecord(**json.loads(paths.record.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(api_url: str, timeout: float) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _is_server_process(pid: int) -> bool:
    """Whether ``pid`` is alive and still a ``prefect server start`` (not a reused pid)."""
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return False
    return "prefect" in command and "server" in command


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (connections of a stopped one may linger)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _choose_port(asked: int | None) -> int:
    if asked is not None:
        if not _port_free(asked):
            raise BadInput(f"port {asked} on 127.0.0.1 is in use: choose another --port")
        return asked
    return DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()


def server_environment(paths: ServerPaths, api_url: str, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the local server: the batching settings of deployments/server.py
    (unless the operator set them), its own PREFECT_HOME and SQLite database, analytics off."""
    from deployments.server import SERVER_SETTINGS

    env = {**SERVER_SETTINGS, **base}
    env.update(
        {
            "PREFECT_HOME": str(paths.prefect_home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{paths.database}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": env.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"),
            # The UI it serves calls this API (by default it would call port 4200).
            "PREFECT_UI_API_URL": api_url,
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


def _wait_healthy(api_url: str, timeout: float, log: Path, pid: int) -> None:
    """Wait until the API answers; a RuntimeError (with the log's tail) if its process ``pid``
    exits first or it does not answer within ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            exited = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            exited = True
        if exited:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError("the Prefect server exited:\n" + "\n".join(tail))
        if healthy(api_url, timeout=2):
            return
        time.sleep(0.25)
    raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s (log: {log})")


def start_server(
    paths: ServerPaths, port: int | None, timeout: float = START_TIMEOUT_SECONDS
) -> ServerRecord:
    """Start the local server (or return the one running), wait for its health, record it."""
    running = read_record(paths)
    if running is not None and _is_server_process(running.pid):
        _wait_healthy(running.api_url, timeout, paths.log, running.pid)  # it may be starting
        start_launcher(paths, running)
        return running
    chosen = _choose_port(port)
    api_url = f"http://127.0.0.1:{chosen}/api"
    paths.prefect_home.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "ab") as log:
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        process = subprocess.Popen(
            [*command, "--port", str(chosen)],
            env=server_environment(paths, api_url, os.environ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; stopped as a group
        )
    record = ServerRecord(process.pid, chosen, api_url, datetime.now(UTC).isoformat(timespec="seconds"))
    paths.record.write_text(json.dumps(asdict(record)))
    try:
        _wait_healthy(api_url, timeout, paths.log, process.pid)
    except BaseException:
        _stop_group(process.pid)
        paths.record.unlink(missing_ok=True)
        raise
    start_launcher(paths, record)
    return record


def launcher_pid(paths: ServerPaths) -> int | None:
    """The pid of the server's launcher (irefine/launcher.py) if one is running."""
    from deployments.cluster.procs import alive

    try:
        pid = int((paths.root / "launcher.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def start_launcher(paths: ServerPaths, record: ServerRecord) -> None:
    """Start the launcher that runs ``irefine run`` warm, from the user's environment (not with
    IRE_LAUNCHER=off)."""
    from irefine.launcher import enabled

    if not enabled(os.environ):
        return
    if launcher_pid(paths) is not None:
        return
    from irefine.cli import USER_ENVIRONMENT

    with open(paths.root / "launcher.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "irefine.launcher", str(paths.root), str(record.pid), record.api_url],
            env=dict(USER_ENVIRONMENT or os.environ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # exits when the server does; `server stop` stops it first
        )
    (paths.root / "launcher.pid").write_text(str(process.pid))
    # Ready when it listens (it imports Prefect, Dask and the engine first: a few seconds); a run
    # that comes before that starts cold, so `server start` waits for it.
    deadline = time.monotonic() + LAUNCHER_START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if (paths.root / "launcher.sock").exists():
            return
        time.sleep(0.1)
    logging.getLogger("irefine").warning(
        "the launcher did not start (runs start cold; see %s)", paths.root / "launcher.log"
    )


def _stop_group(pid: int, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout`` seconds."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it when this process started it


def stop_server(paths: ServerPaths) -> ServerRecord | None:
    """Stop the recorded server and forget it; returns what was recorded (None if nothing)."""
    record = read_record(paths)
    launcher = launcher_pid(paths)
    if launcher is not None:
        _stop_group(launcher)
    (paths.root / "launcher.pid").unlink(missing_ok=True)
    (paths.root / "launcher.sock").unlink(missing_ok=True)
    if record is not None and _is_server_process(record.pid):
        _stop_group(record.pid)
    paths.record.unlink(missing_ok=True)
    return record


def server_status(paths: ServerPaths) -> dict[str, Any]:
    """The ``server status --json`` contract."""
    record = read_record(paths)
    alive = record is not None and _is_server_process(record.pid)
    return {
        "running": alive,
        "healthy": alive and record is not None and healthy(record.api_url, timeout=2),
        "api_url": record.api_url if alive and record else None,
        "ui_url": record.ui_url if alive and record else None,
        "pid": record.pid if alive and record else None,
        "port": record.port if alive and record else None,
        "started_at": record.started_at if alive and record else None,
        "launcher_pid": launcher_pid(paths) if alive else None,
        "log": str(paths.log),
        "home": str(paths.root),
    }


# -- which Prefect API `irefine run` uses ----------------------------------------------------------


def _profile_api_url(environ: Mapping[str, str]) -> str | None:
    """PREFECT_API_URL of the active Prefect profile (``prefect config set``), read without
    importing Prefect (its import fixes its settings, so the choice must come first)."""
    home = Path(environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


@dataclass
class ApiChoice:
    """The Prefect API a run uses: ``environment`` (PREFECT_API_URL or the Prefect profile),
    ``local`` (the server of ``irefine server start``) or ``temporary`` (forgets the run at exit)."""

    source: Literal["environment", "local", "temporary"]
    api_url: str | None
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _told: bool = False

    @property
    def keeps_runs(self) -> bool:
        return self.source != "temporary"

    def tell_how_to_keep_runs(self) -> None:
        """Say once, on stderr, that a temporary API forgets the run and how to keep runs."""
        if not self.keeps_runs and not self._told:
            print(KEEP_RUNS_HINT, file=sys.stderr, flush=True)
            self._told = True

    def wait_ready(self, timeout: float) -> None:
        """Wait for the temporary API to answer (a no-op for the others)."""
        if self.process is None or self.api_url is None or self._log is None:
            return
        try:
            _wait_healthy(self.api_url, timeout, Path(self._log.name), self.process.pid)
        except RuntimeError as exc:  # its log is removed at exit: say what to do instead
            raise RuntimeError(
                f"the temporary Prefect API did not start ({str(exc).partition(' (log:')[0]}); keep a "
                "server running instead (irefine server start) or raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
            ) from None

    def close(self) -> None:
        """Stop the temporary API, after this process has sent it its buffered logs and events."""
        if self.process is None:
            return
        if "prefect" in sys.modules:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
        stop_process(self.process, 5)
        self.process = None
        if self._log is not None:
            self._log.close()


def _start_temporary_api(environ: MutableMapping[str, str]) -> ApiChoice:
    """Launch the API server Prefect's ephemeral mode runs (UI off), on a free loopback port, and
    point this process at it; does not wait for it (see :meth:`ApiChoice.wait_ready`)."""
    import tempfile

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **environ,
        "PREFECT_UI_ENABLED": "0",
        # Registering block types loads every Prefect collection installed (prefect-azure,
        # -kubernetes, -docker...): seconds of start-up, for a block catalogue no UI will show.
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
        "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",  # its check loads them too
        # It serves this run's client alone and no UI, and forgets everything at exit: the event
        # services (task-run history, event storage, automations, the event stream out) would only
        # take CPU from the job, at start (~0.4 s) and for every event of every cycle.
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        "PREFECT_API_EVENTS_STREAM_OUT_ENABLED": "false",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    # In the system's temporary folder: a run refused after this wrote nothing under IRE_HOME.
    log = tempfile.NamedTemporaryFile(prefix="prefect-temporary-api-", suffix=".log")  # noqa: SIM115 - closed in ApiChoice.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    environ["PREFECT_API_URL"] = api_url
    return ApiChoice("temporary", api_url, process, log)


def api_for_run(environ: MutableMapping[str, str] = os.environ) -> ApiChoice:
    """Choose the Prefect API of an in-process run (before Prefect is imported) and point
    ``environ`` at it, launching a temporary one if there is no other."""
    url = environ.get("PREFECT_API_URL") or _profile_api_url(environ)
    if url:
        return ApiChoice("environment", url)
    home = _ire_home()
    record = read_record(ServerPaths.of(home))
    if record is not None and healthy(record.api_url, timeout=1):
        environ["PREFECT_API_URL"] = record.api_url
        return ApiChoice("local", record.api_url)
    return _start_temporary_api(environ)


_chosen: ApiChoice | None = None


def api_of_this_run() -> ApiChoice:
    """:func:`api_for_run` for this process, chosen (and a temporary API launched) on the first
    call, as early as the CLI knows its input is good: the temporary API then starts while the
    CLI imports the engine and writes the job. Stopped at exit at the latest."""
    global _chosen
    if _chosen is None:
        _chosen = api_for_run()
        atexit.register(_chosen.close)
    return _chosen


def flow_run_url(flow_run_id: str) -> str | None:
    """The Prefect UI address of a flow run (Prefect derives the UI from the API address)."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id)


def _flow_run_of(job_id: str) -> str | None:
    """The flow run that last ran ``job_id``, as its job store recorded it."""
    from engine.settings import load_settings
    from engine.store import JobStore

    store = JobStore.from_settings(load_settings())
    try:
        return store.get_job(job_id, fresh=True).flow_run_id
    finally:
        store.close()


def run_hints(choice: ApiChoice, job_id: str) -> list[str]:
    """What to print after a run: its flow run's UI address when a server keeps it, and where to
    look at the job from the shell."""
    lines: list[str] = []
    if choice.keeps_runs:
        try:
            flow_run_id = _flow_run_of(job_id)
        except Exception as exc:  # a hint: the outcome is printed already
            logging.getLogger("irefine").warning("no Prefect UI address for job %s: %s", job_id, exc)
            flow_run_id = None
        url = flow_run_url(flow_run_id) if flow_run_id else None
        if url:
            lines.append(f"  Prefect UI: {url}")
    lines.append(f"  irefine status {job_id}   (this job)    irefine top   (live view of running jobs)")
    return lines


# -- the command ---------------------------------------------------------------------------------


def _print_status(status: dict[str, Any]) -> None:
    if not status["running"]:
        print(f"no local Prefect server running (start one: irefine server start); state in {status['home']}")
        return
    health = "ok" if status["healthy"] else "not answering"
    print(f"{'api':>8}: {status['api_url']}")
    print(f"{'ui':>8}: {status['ui_url']}")
    print(f"{'pid':>8}: {status['pid']}")
    print(f"{'health':>8}: {health}")
    print(f"{'since':>8}: {status['started_at']}")
    launcher = f"pid {status['launcher_pid']}" if status["launcher_pid"] else "none (runs start cold)"
    print(f"{'launcher':>8}: {launcher}")
    print(f"{'log':>8}: {status['log']}")


def cmd_server(args: argparse.Namespace) -> int:
    paths = ServerPaths.of(_ire_home())
    if args.server_command == "start":
        if args.port is not None and not 1 <= args.port <= 65535:
            raise BadInput(f"--port {args.port}: use a port number from 1 to 65535")
        was = read_record(paths)
        try:
            record = start_server(paths, args.port)
        except RuntimeError as exc:
            print(f"irefine: {exc}", file=sys.stderr)
            return EXIT_FAILED
        verb = "running" if was == record else "started"
        print(f"Prefect server {verb} at {record.api_url} (pid {record.pid})")
        print(f"  Prefect UI: {record.ui_url}")
        print("  `irefine run` now keeps its runs there; stop it with `irefine server stop`")
        return EXIT_OK
    if args.server_command == "stop":
        stopped = stop_server(paths)
        if stopped is None:
            print("no local Prefect server was running")
        else:
            print(f"stopped the Prefect server at {stopped.api_url}")
        return EXIT_OK
    status = server_status(paths)
    if args.json:
        print(json.dumps(status))
    else:
        _print_status(status)
    return EXIT_OK if status["healthy"] else EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Add ``server`` to the CLI's subcommands."""
    p = sub.add_parser(
        "server",
        help="start, stop or show a local Prefect server that keeps runs for the UI",
        description="A local Prefect server (SQLite, state under IRE_HOME/server) on 127.0.0.1. While "
        "it runs, `irefine run` and `irefine resume` keep their flow runs there, to see in the UI.",
    )
    server_sub = p.add_subparsers(dest="server_command", required=True, metavar="SERVER_COMMAND")
    start = server_sub.add_parser("start", help="start it in the background and wait until it answers")
    start.add_argument("--port", type=int, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}, or a free one)")
    start.set_defaults(func=cmd_server)
    server_sub.add_parser("stop", help="stop it").set_defaults(func=cmd_server)
    status = server_sub.add_parser("status", help="its address, pid and health (exit 1 when none answers)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_server)
