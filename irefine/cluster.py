"""``irefine cluster up | down | status | failover``: the highly available topology on one machine
(deployments/cluster). Exit codes: 0 done, 1 a part failed (the message names it), 2 bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from irefine.errors import EXIT_FAILED, EXIT_OK, BadInput


def add_parser(sub: Any) -> None:
    """Add ``cluster`` to the CLI's subcommands."""
    p = sub.add_parser(
        "cluster",
        help="run the highly available topology on this machine (PostgreSQL+replica, Redis, 2 API "
        "replicas behind HAProxy, 2 services, Dask, 2 workers)",
        description="Each part is a real process on loopback with its state under --dir "
        "(default IRE_HOME/cluster). Clients use the balancer's address only: "
        "`irefine cluster status --json` prints it with every part's pid, health and role.",
    )
    p.add_argument("--dir", type=Path, help="cluster folder (default: IRE_HOME/cluster)")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True, metavar="CLUSTER_COMMAND")
    up = cluster_sub.add_parser("up", help="start every part in order, waiting on each one's health")
    up.add_argument(
        "--port", type=int, default=4200, help="balancer port on 127.0.0.1 (default 4200; 0: any free)"
    )
    up.add_argument(
        "--job-limit", type=int, default=4, metavar="N", help="jobs running at once (irefine setup)"
    )
    up.set_defaults(func=cmd_cluster_up)
    down = cluster_sub.add_parser("down", help="stop every part; no process is left")
    down.set_defaults(func=cmd_cluster_down)
    status = cluster_sub.add_parser("status", help="each part's pid, address, health and role")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_cluster_status)
    failover = cluster_sub.add_parser(
        "failover",
        help="fence the PostgreSQL primary, promote the replica, rewind the old primary as replica",
    )
    failover.set_defaults(func=cmd_cluster_failover)


def _cluster(args: argparse.Namespace, quiet: bool = False) -> Any:
    from deployments.cluster import Cluster, default_folder

    folder = args.dir or default_folder()
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"--dir {folder}: not a folder")
    return Cluster(folder, log=(lambda line: None) if quiet else (lambda line: print(line, flush=True)))


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from deployments.cluster import ClusterError

    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port {args.port}: give a port 1-65535, or 0 for any free one")
    if args.job_limit < 1:
        raise BadInput(f"--job-limit {args.job_limit}: give at least 1")
    cluster = _cluster(args)
    try:
        cluster.check_folder()
    except ClusterError as exc:
        raise BadInput(f"--dir {cluster.folder}: {exc}") from None
    try:
        seconds = cluster.up(balancer_port=args.port, job_limit=args.job_limit)
    except ClusterError as exc:
        print(f"irefine: error: cluster up failed: {exc}")
        return EXIT_FAILED
    print(f"cluster up in {seconds:.1f} s; clients use PREFECT_API_URL={cluster.api_url}")
    for key, value in cluster.client_env().items():
        print(f"export {key}={value!r}")
    return EXIT_OK


def cmd_cluster_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    stopped = cluster.down()
    left = cluster.leftovers()
    print(
        f"stopped {len(stopped)} parts" + (f"; still running: pids {left}" if left else "; no process left")
    )
    return EXIT_FAILED if left else EXIT_OK


def cmd_cluster_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args, quiet=True)
    parts = cluster.status()
    if not parts:
        raise BadInput(f"no cluster in {cluster.folder}: run `irefine cluster up` (or pass --dir)")
    if args.json:
        print(json.dumps({"folder": str(cluster.folder), "api_url": cluster.api_url, "parts": parts}))
    else:
        print(f"{'PART':<16} {'PID':>7}  {'ADDRESS':<17} {'HEALTH':<20} ROLE")
        for part in parts:
            print(
                f"{part['name']:<16} {part['pid'] or '-':>7}  {part['address'] or '-':<17} "
                f"{part['health']:<20} {part['role'] or ''}"
            )
    return EXIT_OK if all(p["health"] == "ok" for p in parts) else EXIT_FAILED


def cmd_cluster_failover(args: argparse.Namespace) -> int:
    from deployments.cluster import ClusterError

    cluster = _cluster(args)
    if not cluster.state.get("ports"):
        raise BadInput(f"no cluster in {cluster.folder}: run `irefine cluster up` (or pass --dir)")
    try:
        timings = cluster.failover()
    except ClusterError as exc:
        print(f"irefine: error: failover failed: {exc}")
        return EXIT_FAILED
    print(json.dumps(timings))
    return EXIT_OK
