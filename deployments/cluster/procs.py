"""Process helpers for ``irefine cluster``: each part runs in its own process group (a "node"), so
stopping or killing a part takes every process it started with it."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path


class ClusterError(RuntimeError):
    """A part of the cluster could not be started, reached or stopped; the message names the part."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def alive(pid: int | None) -> bool:
    """True while process ``pid`` runs (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def reap() -> None:
    """Collect our exited children, so that they do not stay zombies while this process runs."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def spawn(
    command: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> int:
    """Start ``command`` in a new session (its own process group), output to ``log``; its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
        )
    return process.pid


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def process_stats() -> Iterator[list[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...) of every
    process still readable."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue


def group_size(pgid: int) -> int:
    """How many live processes group ``pgid`` has."""
    return sum(1 for fields in process_stats() if fields[0] != "Z" and int(fields[2]) == pgid)


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` runs."""
    return group_size(pgid) > 0


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the group of ``pid``; SIGKILL whatever is left after ``timeout`` seconds."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        if not group_alive(pid):
            return
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_alive(pid):
        reap()
        time.sleep(0.05)


def wait_until(check: Callable[[], bool], timeout: float, failure: Callable[[], str]) -> float:
    """Poll ``check`` until true; the seconds it took. :class:`ClusterError` with ``failure()`` on timeout."""
    start = time.monotonic()
    while True:
        reap()
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise ClusterError(failure())
        time.sleep(0.1)


def system_user() -> str | None:
    """The user PostgreSQL runs as: None (ourselves) unless we are root, then ``postgres``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "iretest"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ClusterError(
        "postgres: running as root needs a system user 'postgres' (apt-get install postgresql)"
    )


def run_as(user: str | None, command: Sequence[str], *, cwd: Path, what: str, timeout: float = 120) -> str:
    """Run ``command`` (as ``user``) and return its output; :class:`ClusterError` naming ``what``."""
    group = pwd.getpwnam(user).pw_gid if user else None
    try:
        done = subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=user,
            group=group,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{what}: {Path(command[0]).name} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ClusterError(
            f"{what}: {Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()[-800:]}"
        )
    return done.stdout


def chown_to(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively) to ``user``."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)
