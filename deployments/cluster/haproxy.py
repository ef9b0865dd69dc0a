"""HAProxy in front of the API replicas: health checks on ``/api/health``, redispatch of failed
connections, long tunnel timeouts for the events websockets, and drain through the admin socket."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from deployments.cluster.procs import ClusterError

BACKEND = "prefect_api"


def haproxy_binary() -> str:
    """The path of ``haproxy``; :class:`ClusterError` saying how to install it."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not found:
        raise ClusterError(
            "balancer: haproxy not found: install it (apt-get install haproxy; scripts/setup.sh --services)"
        )
    return found


def render_config(port: int, replicas: Mapping[str, int], admin_socket: Path, pidfile: Path) -> str:
    """The configuration: one frontend on 127.0.0.1:``port``, one backend server per replica."""
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{replica_port} check" for name, replica_port in replicas.items()
    )
    return f"""# Written by `irefine cluster up`.
global
    stats socket {admin_socket} mode 600 level admin
    pidfile {pidfile}
    maxconn 4096

defaults
    mode http
    option httplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # events websockets (flow runs' event stream, the UI) stay open for hours
    timeout tunnel 8h
    timeout http-keep-alive 30s
    # a request whose connection failed, or that got no byte back from a dying replica, goes to
    # another replica: Prefect's client would retry it anyway
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend prefect
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    option httpchk GET /api/health
    http-check expect status 200
    default-server inter 1s fastinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
"""


def admin(admin_socket: Path, command: str, timeout: float = 5.0) -> str:
    """Send one command to HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(admin_socket))
        except OSError as exc:
            raise ClusterError(f"balancer: admin socket {admin_socket}: {exc.strerror or exc}") from None
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def server_states(admin_socket: Path) -> dict[str, str]:
    """Each replica's state as the balancer sees it: ``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ..."""
    answer = admin(admin_socket, "show stat")
    header, *rows = [line for line in answer.splitlines() if line.strip()]
    columns = header.lstrip("# ").split(",")
    states: dict[str, str] = {}
    for row in rows:
        record = dict(zip(columns, row.split(","), strict=False))
        if record.get("pxname") == BACKEND and record.get("svname") not in ("FRONTEND", "BACKEND"):
            states[record["svname"]] = record.get("status", "?")
    return states


def set_state(admin_socket: Path, replica: str, state: str) -> None:
    """``ready``, ``drain`` (no new requests, open ones finish) or ``maint`` for one replica."""
    answer = admin(admin_socket, f"set server {BACKEND}/{replica} state {state}").strip()
    if answer:
        raise ClusterError(f"balancer: set {replica} {state}: {answer}")
