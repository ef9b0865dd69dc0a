"""``irefine worker``: run a work pool's flow runs, taking turns with the pool's other workers to poll.

``prefect worker start`` works, but two of its workers polling a pool at the same moment can take
lower-priority runs ahead of higher-priority ones and, together, more runs than the pool's limit
(deployments/worker.py says why). ``irefine worker`` starts the same Prefect worker (process or
kubernetes) with polls in turns: one worker of the pool at a time, through the global limit
``irefine-worker-poll`` that ``irefine setup`` creates.

Exit codes: 2 bad input or missing set-up (the pool or the poll limit does not exist), 130 stopped
by Ctrl-C or SIGTERM; it runs until then (with ``--run-once``: one poll, then 0 once its runs end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from irefine.errors import EXIT_OK, BadInput

WORKER_TYPES = ("process", "kubernetes")


def add_parser(sub: Any) -> None:
    """Add ``worker`` to the CLI's subcommands."""
    p = sub.add_parser(
        "worker",
        help="run a work pool's flow runs, polling in turns with its other workers (needs a Prefect server)",
        description="Start a Prefect worker (process or kubernetes) on POOL. Unlike `prefect worker "
        "start`, the pool's workers poll one at a time (the global limit irefine-worker-poll, from "
        "`irefine setup`), each until the runs it was given are Pending: two polls at the same "
        "moment would take lower-priority runs first and more runs than the pool's limit. Stop it "
        "with Ctrl-C or SIGTERM (exit 130). Exit code 2: bad input, or the pool or the limit is "
        "missing (run `irefine setup`).",
    )
    p.add_argument("--pool", required=True, help="work pool to poll, e.g. irefine-local or irefine-aks")
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="flow runs this worker runs at once (default: no limit of its own; keep it above the "
        "pool's job limit so that the pool's limit, which follows queue priority, is the one that binds)",
    )
    p.add_argument("--type", choices=WORKER_TYPES, help="worker type (default: the pool's type)")
    p.add_argument("--name", help="worker name shown in the UI (default: a fresh one)")
    p.add_argument(
        "--work-queue",
        action="append",
        metavar="Q",
        help="poll only this queue (repeatable; default: all queues of the pool, in priority order)",
    )
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING"],
        default="INFO",
        help="worker log level on the terminal (default INFO: each flow run it takes)",
    )
    p.add_argument("--run-once", action="store_true", help="poll once, wait for its runs to end, exit")
    p.set_defaults(func=cmd_worker)


async def _worker_class(pool: str, worker_type: str | None) -> type[Any]:
    """The turn-taking worker class for ``pool``; BadInput when the pool, its type or the poll
    limit does not fit."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.worker import (
        PollLimitMissing,
        TurnTakingProcessWorker,
        check_poll_limit,
        turn_taking_kubernetes_worker,
    )

    async with get_client() as client:
        try:
            work_pool = await client.read_work_pool(pool)
        except ObjectNotFound:
            raise BadInput(
                f"work pool {pool!r} does not exist: run `irefine setup` or pass another --pool"
            ) from None
        if work_pool.type not in WORKER_TYPES:
            raise BadInput(
                f"work pool {pool!r} has type {work_pool.type!r}: "
                "irefine worker runs process and kubernetes pools"
            )
        if worker_type is not None and worker_type != work_pool.type:
            raise BadInput(
                f"--type {worker_type}: work pool {pool!r} has type {work_pool.type!r}; drop --type"
            )
        try:
            await check_poll_limit(client)
        except PollLimitMissing as exc:
            raise BadInput(str(exc)) from None
    return TurnTakingProcessWorker if work_pool.type == "process" else turn_taking_kubernetes_worker()


def cmd_worker(args: argparse.Namespace) -> int:
    """``irefine worker``: see the module docstring."""
    if args.limit is not None and args.limit < 1:
        raise BadInput(f"--limit {args.limit}: give at least 1")
    if args.name is not None and ("/" in args.name or "%" in args.name):
        raise BadInput(f"--name {args.name!r}: a worker name cannot contain '/' or '%'")
    # Before Prefect is imported: a worker's log is what its operator watches.
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = args.log_level
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.api.url:
        raise BadInput(
            "worker needs a Prefect server: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    worker_class = asyncio.run(_worker_class(args.pool, args.type))

    from prefect.utilities.processutils import setup_signal_handlers_worker

    # As `prefect worker start`: the first SIGTERM or Ctrl-C stops polling (KeyboardInterrupt,
    # exit 130), a second one kills.
    setup_signal_handlers_worker(os.getpid(), f"the {worker_class.type} worker", print)
    worker = worker_class(
        name=args.name,
        work_pool_name=args.pool,
        work_queues=args.work_queue,
        limit=args.limit,
        prefetch_seconds=settings.worker.prefetch_seconds,
        heartbeat_interval_seconds=int(settings.worker.heartbeat_seconds),
        create_pool_if_not_found=False,
    )
    asyncio.run(worker.start(run_once=args.run_once, printer=print))
    return EXIT_OK
