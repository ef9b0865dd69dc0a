"""The launcher: a warm process beside the local server that runs ``irefine run`` and ``resume``.

A cold ``irefine run`` spends most of its first seconds importing Prefect, Dask and the engine.
``irefine server start`` therefore also starts this process, which imports all of that once, starts
no thread, and waits on a Unix socket (``IRE_HOME/server/launcher.sock``, mode 0600: only its user
may connect). ``irefine run`` hands it its arguments, environment, working directory and its own
stdin/stdout/stderr (passed as file descriptors); the launcher forks a child that runs the command
exactly as the CLI would (same code, same terminal, its own process group) and reports its exit
code back. The CLI forwards Ctrl-C to the child. Nothing else changes: the child chooses its
Prefect API, writes the job and starts its Dask cluster like a cold run.

The launcher declines (and the CLI runs the command itself) when the run would not be the same as
a cold one: a different Python, environment (``PREFECT_*``, ``IRE_*``, ``DASK_*``, ``PYTHONPATH``,
``HOME``) or project source (a file of the engine changed since the launcher imported it; it then
restarts itself as soon as no run of its own is in flight). ``IRE_LAUNCHER=off`` turns it off for a
command. It exits when the local server it belongs to stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deployments.cluster.procs import alive

DELEGATED = ("run", "resume")
"""The commands a launcher runs (the others are quick to start, or must run in the caller)."""
_ENV_PREFIXES = ("PREFECT_", "IRE_", "DASK_")
_ENV_NAMES = ("PYTHONPATH", "HOME")
_PROJECT = Path(__file__).resolve().parent.parent
_PACKAGES = ("engine", "flows", "irefine", "deployments", "blocks")
_MAX_MESSAGE = 4 << 20


def socket_path(server_root: Path) -> Path:
    return server_root / "launcher.sock"


def enabled(environ: Mapping[str, str]) -> bool:
    """False when ``IRE_LAUNCHER`` turns the launcher off (off, 0, false, no)."""
    return environ.get("IRE_LAUNCHER", "on").lower() not in ("off", "0", "false", "no")


def server_root_of(environ: Mapping[str, str]) -> Path:
    """``IRE_HOME/server`` as the settings resolve it, without importing them (that costs ~0.5 s)."""
    home = environ.get("IRE_HOME") or str(Path.home() / ".irefine")
    return Path(home).expanduser() / "server"


def _fingerprint(environ: Mapping[str, str]) -> dict[str, Any]:
    """What must be equal for a forked child to run a command as a cold process would."""
    env = {k: v for k, v in environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    env.pop("IRE_LAUNCHER", None)
    return {"python": sys.executable, "env": env}


def _send(conn: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)


def _recv(conn: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (None when the peer closed) and the file descriptors that came with it."""
    fds: list[int] = []
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        if len(buf) >= 4 and struct.unpack("!I", buf[:4])[0] > _MAX_MESSAGE:
            raise ValueError("launcher message too long")
        if max_fds and not fds:
            chunk, got, _flags, _addr = socket.recv_fds(conn, 1 << 16, max_fds)
            fds.extend(got)
        else:
            chunk = conn.recv(1 << 16)
        if not chunk:
            return None, fds
        buf += chunk
    return json.loads(buf[4 : 4 + struct.unpack("!I", buf[:4])[0]]), fds


# -- the CLI's side ---------------------------------------------------------------------------------


def delegate(argv: Sequence[str], server_root: Path) -> int | None:
    """Run ``argv`` in the launcher and return its exit code; None when there is no launcher or it
    declines (the caller then runs the command itself)."""
    if not enabled(os.environ):
        return None
    from irefine.server import _profile_api_url

    if os.environ.get("PREFECT_API_URL") or _profile_api_url(os.environ):
        return None  # the run uses another Prefect API than the local server's: run it here
    path = socket_path(server_root)
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)
        conn.connect(str(path))
        request = {"argv": list(argv), "cwd": os.getcwd(), "environ": dict(os.environ)}
        request.update(_fingerprint(os.environ))
        _send(conn, request, (sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()))
        reply, _ = _recv(conn)
    except (OSError, ValueError):
        conn.close()
        return None
    if reply is None or "pid" not in reply:
        conn.close()
        return None
    pid = int(reply["pid"])

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        conn.settimeout(None)
        while True:
            try:
                done, _ = _recv(conn)
                break
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        conn.close()
    if done is None:  # the launcher went away with the run in flight
        print(f"irefine: the launcher stopped while it ran this command (pid {pid})", file=sys.stderr)
        return 1
    return int(done["exit"])


# -- the launcher's side ----------------------------------------------------------------------------


def _say(line: str) -> None:
    """One line in the launcher's log (its stdout: IRE_HOME/server/launcher.log)."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}", flush=True)


def _project_files() -> dict[str, float]:
    """The project's imported source files and their modification times."""
    files: dict[str, float] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (
            name.split(".")[0] in _PACKAGES or Path(path).resolve().is_relative_to(_PROJECT / "irefine")
        ):
            with contextlib.suppress(OSError):
                files[path] = os.stat(path).st_mtime
    return files


def _stale(files: Mapping[str, float]) -> bool:
    for path, mtime in files.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return True
        except OSError:
            return True
    return False


def _warm_up() -> None:
    """Import what a run imports, and start nothing (a thread would not survive the fork)."""
    import distributed  # noqa: F401
    import optuna  # noqa: F401
    import rich.console
    import rich.progress  # noqa: F401

    import engine.runner
    import flows.refine  # noqa: F401
    import irefine.cli  # noqa: F401
    from engine.strategies.cmaes import _import_cma

    _import_cma()
    # What a run imports lazily (found by diffing sys.modules before and after a run): the anomaly
    # detector's scipy (~0.3 s), Prefect's parameter encoding (fastapi, ~0.2 s) and flow
    # visualisation module, the Dask executor. After _import_cma, which hides scipy.stats from cma.
    import fastapi.encoders  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401
    import scipy.optimize
    import scipy.special  # noqa: F401

    import engine.execution.dask
    import engine.problems.benchmarks  # noqa: F401


def _run_child(request: Mapping[str, Any], fds: Sequence[int], listener: socket.socket) -> None:
    """In the forked child: become the caller's command, then exit with its code."""
    listener.close()
    os.setpgid(0, 0)  # its own group: stopping the server does not kill a run in flight
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["environ"])
    os.environ["IRE_LAUNCHER"] = "off"  # the child runs the command itself
    os.chdir(request["cwd"])
    sys.stdin = os.fdopen(0, "r", closefd=False)
    sys.stdout = os.fdopen(1, "w", closefd=False, buffering=1)
    sys.stderr = os.fdopen(2, "w", closefd=False, buffering=1)
    import numpy as np

    np.random.seed()  # as a fresh process: not the launcher's state (Python's `random` reseeds itself)
    from irefine.cli import main

    main(request["argv"])  # exits


def serve(server_root: Path, server_pid: int, api_url: str) -> None:
    """Import, listen, fork a child for each request, report its exit; return when the server stops
    or the project's source changed and no child is in flight (the caller then re-executes)."""
    mine = _fingerprint(os.environ)  # the environment as the user gave it, before the CLI's defaults
    from irefine.cli import _quiet_prefect

    _quiet_prefect()
    os.environ["PREFECT_API_URL"] = api_url  # as a run's CLI sets it before importing Prefect
    _warm_up()
    files = _project_files()
    path = socket_path(server_root)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    _say(f"listening on {path} (pid {os.getpid()}, {len(files)} project files imported)")
    listener.settimeout(0.2)
    waiting: dict[int, socket.socket] = {}
    stale = False
    last_check = 0.0
    while True:
        _reap(waiting)
        if time.monotonic() - last_check > 1.0:
            last_check = time.monotonic()
            if not alive(server_pid):
                return
            stale = stale or _stale(files)
            if stale and not waiting:
                return
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            conn.settimeout(5)
            request, fds = _recv(conn, max_fds=3)
        except (OSError, ValueError):
            conn.close()
            continue
        if request is None or len(fds) != 3:
            reason = "incomplete request"
        elif stale or _stale(files):
            stale, reason = True, "the project's source changed since the launcher started"
        elif {k: request.get(k) for k in mine} != mine:
            reason = "another Python or environment"
        elif not request.get("argv") or request["argv"][0] not in DELEGATED:
            reason = "not a command the launcher runs"
        else:
            reason = ""
        if reason:
            _say(f"declined {' '.join((request or {}).get('argv', [])[:1])}: {reason}")
            with contextlib.suppress(OSError):
                _send(conn, {"declined": reason})
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        assert request is not None
        pid = os.fork()
        if pid == 0:  # the child: its SystemExit ends the process as the command's would
            conn.close()
            _run_child(request, fds, listener)
            os._exit(1)  # not reached: the command exits by itself
        for fd in fds:
            os.close(fd)
        _say(f"ran {request['argv'][0]} as pid {pid}")
        try:
            _send(conn, {"pid": pid})
            waiting[pid] = conn
        except OSError:
            conn.close()


def _reap(waiting: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            code = code if code >= 0 else 128 - code
            _say(f"pid {pid} exited {code}")
            with contextlib.suppress(OSError):
                _send(conn, {"exit": code})
            conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m irefine.launcher SERVER_ROOT SERVER_PID API_URL``: serve until the server stops;
    after a source change, start again as a new image (fresh imports)."""
    args = list(sys.argv[1:] if argv is None else argv)
    root, server_pid, api_url = Path(args[0]), int(args[1]), args[2]
    serve(root, server_pid, api_url)
    if alive(server_pid):  # the source changed: come back with fresh imports
        _say("the project's source changed: starting again")
        os.execv(sys.executable, [sys.executable, "-m", "irefine.launcher", *args])
    socket_path(root).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
