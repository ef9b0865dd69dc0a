"""Fault drills on a real ``irefine cluster`` (deployments/cluster/drills.py): one cluster is brought
up in a temporary folder, every drill (or those named with --only) runs on it in turn, and the
cluster is taken down at the end, whatever happened.

Progress goes to stderr; the last stdout line is one JSON object::

    {"bench": "drills", "cluster_up_s": ..., "drills": {"<name>": {"jobs_started", "jobs_completed",
     "results_equal", "evaluations_lost", "duplicate_cycles", "failed_requests", "recovery_s", ...}}}

From the repository root::

    .venv/bin/python bench/drills.py [--only api_replica_kill,redis_stop_30s] [--jobs 4] [--cycles 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(line: str) -> None:
    print(f"[drills {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main() -> None:
    from deployments.cluster import Cluster
    from deployments.cluster.drills import DRILLS, run_drill

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated drill names (default: all): " + ", ".join(DRILLS))
    parser.add_argument("--jobs", type=int, default=4, help="jobs per drill, over the four queues")
    parser.add_argument("--cycles", type=int, default=16, help="cycles per job")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds a drill waits for its jobs")
    parser.add_argument(
        "--dir", type=Path, help="use the running cluster of this folder (left running) instead of a new one"
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(DRILLS)
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        parser.error(f"--only: unknown drills {unknown}; known: {', '.join(DRILLS)}")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The drills' jobs run tests.problems_for_tests through deployment runs: the nodes' allow-list.
    os.environ.setdefault("IRE_PROBLEM_MODULES", "tests")
    if args.dir:
        cluster = Cluster(args.dir, log=log)
        if not cluster.state.get("ports"):
            parser.error(f"--dir {args.dir}: no cluster there")
    else:
        folder = Path(tempfile.mkdtemp(prefix="ire-drills-", dir="/tmp"))
        folder.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data folder
        cluster = Cluster(folder / "cluster", log=log)
    figures: dict[str, object] = {}
    up_seconds = cluster.state.get("up_seconds")
    try:
        if not args.dir:
            up_seconds = cluster.up(balancer_port=0, job_limit=args.jobs)
            log(f"cluster up in {up_seconds:.1f} s")
        for name in names:
            log(f"drill {name}")
            try:
                figures[name] = run_drill(
                    cluster,
                    name,
                    DRILLS[name],
                    jobs=args.jobs,
                    cycles=args.cycles,
                    timeout=args.timeout,
                    log=log,
                )
            except Exception as exc:  # one failed drill must not hide the others' figures
                figures[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"{name}: {json.dumps(figures[name])}")
    finally:
        if not args.dir:
            cluster.down()
            left = cluster.leftovers()
            if left:
                log(f"processes left after down: {left}")
    print(json.dumps({"bench": "drills", "cluster_up_s": up_seconds, "drills": figures}))


if __name__ == "__main__":
    main()
