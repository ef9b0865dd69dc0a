"""Issue 4's priority scenario as a benchmark: 30 jobs of mixed priority, two process workers.

Starts a private PostgreSQL (one database for the Prefect server, one for the job store) and a
``prefect server start`` on it, then runs ``tests/queue_scenario.py``: ``irefine setup`` twice,
``prefect deploy`` of ``refine``, 30 submissions through ``irefine submit``'s entry point (at once:
the rate limit paces them), two ``irefine worker --limit 6`` workers (polling in turns) started
once every job waits, a job limit of 3. Everything is removed at the end.

Progress goes to stderr; the last stdout line is one JSON object. From the repository root::

    .venv/bin/python bench/queues.py
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
    print(f"[queues {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="store_true", help="also print each run's times (stderr)")
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from tests.prefect_server import PrefectServer
    from tests.queue_scenario import ScenarioConfig, run_scenario
    from tests.services import PostgresServer

    started = time.monotonic()
    with PostgresServer() as postgres, tempfile.TemporaryDirectory(prefix="ire-bench-queues-") as work:
        log("starting the Prefect server")
        prefect_database = postgres.new_database()
        server = PrefectServer(prefect_database)
        try:
            result = run_scenario(
                server.url,
                postgres.new_database(),
                Path(work),
                ScenarioConfig(),
                log=log,
                prefect_database_url=prefect_database,
            )
        finally:
            server.close()
    summary = result.summary()
    if args.runs:
        chosen = result.chosen_at
        for run in sorted(result.runs, key=lambda r: r.taken or float("inf")):
            log(
                f"{run.job_id:<14} {run.state:<10} created {run.created:.1f} chosen {chosen.get(run.job_id)} "
                f"taken {run.taken} job {run.job_started}..{run.job_ended} ended {run.ended}"
            )
    if summary["priority_inversions"]:
        log(f"inversions (lower, higher): {result.inversions}")
    summary["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
