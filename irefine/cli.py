"""``irefine``: run, resume and inspect refinement jobs from the shell.

Exit codes: 0 done, 1 job failed, 2 bad input (nothing written), 130 interrupted (resumable);
`irefine submit` also exits 3 when the submission rate limit is spent and --no-wait was given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from irefine.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput
from irefine.spec_args import add_spec_flags, build_spec

USER_ENVIRONMENT: dict[str, str] = {}
"""The environment as the user gave it, before :func:`_quiet_prefect`'s defaults (the local
server's launcher starts from it, so that its runs see what a cold run sees)."""


def _quiet_prefect() -> None:
    # Keep Prefect's INFO chatter in the run logs (API) but off the user's terminal.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):
        # The ephemeral API server logs cancelled work as errors when it stops at exit.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        # Its first start migrates a new database: 20 s (Prefect's default wait) is not enough
        # on a small, busy machine.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        # Batched task-run writes (deployments/server.py): the server shares this machine's cores.
        from deployments.server import apply_server_settings

        apply_server_settings()
    # Modules given as module:attr resolve from the working directory, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _open_store() -> Any:
    from engine.settings import load_settings
    from engine.store import JobStore

    return JobStore.from_settings(load_settings())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


class ProgressView:
    """A live progress bar: cycle, evaluations, best score and evaluations per second."""

    def __init__(self, spec: Any, job_id: str, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=False)
        self.enabled = enabled
        self.first: tuple[float, int] | None = None
        self.bar = Progress(
            TextColumn("[bold]{task.fields[job]}"),
            BarColumn(),
            TextColumn("cycle {task.fields[cycle]}"),
            TextColumn("evals {task.completed:.0f}"),
            TextColumn("best {task.fields[best]}"),
            TextColumn("{task.fields[rate]} evals/s"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.bar.add_task(
            "job", total=spec.max_evaluations, job=job_id, cycle=0, best="-", rate="-"
        )

    def __enter__(self) -> ProgressView:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, job: Any, record: Any) -> None:
        p = job.progress
        now = time.perf_counter()
        if self.first is None:
            # Rate from the end of the first cycle on: start-up (Prefect, Dask) is not throughput.
            self.first = (now - record.duration, p.evaluations - record.evaluations)
        t0, done0 = self.first
        rate = (p.evaluations - done0) / max(now - t0, 1e-9)
        self.bar.update(
            self.task, completed=p.evaluations, cycle=p.cycles, best=_fmt(p.best_score), rate=f"{rate:,.0f}"
        )


def _summary(console: Any, result: Any, best_cycle: int | None) -> None:
    console.print(
        f"[bold]job {result.job_id}[/bold] {result.status}: {result.stop_reason or result.error}\n"
        f"  cycles {result.cycles}, evaluations {result.evaluations} "
        f"({result.failed_evaluations} failed)\n"
        f"  cache hits {result.cache_hits}, misses {result.cache_misses}\n"
        f"  best score {_fmt(result.best_score)} at cycle {best_cycle}\n"
        f"  best candidate {json.dumps(result.best_candidate)}"
    )


def _run_flow(job: Any, settings: Any, store: Any, args: argparse.Namespace) -> int:
    """Run the job's flow in this process with a progress bar; map the outcome to an exit code."""
    from engine.core import JobFailedError
    from irefine.server import api_of_this_run, run_hints

    api = api_of_this_run()  # before Prefect's import, which fixes its API address
    if not args.quiet:
        api.tell_how_to_keep_runs()
    prepared = _start_local_cluster(args, settings)  # overlaps the cluster's start with Prefect's import
    view = ProgressView(job.spec, job.job_id, enabled=not args.quiet)
    code = EXIT_OK
    try:
        from engine.observe.logs import bind_log_context
        from flows.refine import InProcessRun, run_refine

        _configure_logs(settings)
        # This process runs this one job: every line is about it (bound once; the flow and the
        # loop find it bound).
        bind_log_context(job_id=job.job_id)
        api.wait_ready(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120)))
        with view:
            result = run_refine(
                InProcessRun(job, settings, store, prepared, listeners=(view,)),
                job_id=job.job_id,
                executor=args.executor,
                dask_address=args.dask_address,
            )
    except KeyboardInterrupt:
        view.console.print(f"interrupted: resume with `irefine resume {job.job_id}`")
        return EXIT_INTERRUPTED
    except JobFailedError as exc:
        view.console.print(f"[red]job {job.job_id} failed:[/red] {exc}")
        code = EXIT_FAILED
    except Exception as exc:
        view.console.print(f"[red]job {job.job_id} failed:[/red] {type(exc).__name__}: {exc}")
        code = EXIT_FAILED
    else:
        if not args.quiet:
            _summary(view.console, result, job.progress.best_cycle)
    finally:
        if prepared is not None:
            _close_prepared(prepared)
        api.close()
    if not args.quiet:
        print("\n".join(run_hints(api, job.job_id)))
    return code


def _configure_logs(settings: Any) -> None:
    """From here on, Prefect's run logs start with ``[job J cycle C]`` and, with IRE_LOG_FORMAT=json,
    console lines are JSON (Prefect has set up its logging by now: importing it does)."""
    from engine.observe.logs import hide_engine_failures_on_console, use_json_logs
    from flows.run_context import prefix_run_logs

    prefix_run_logs()
    if settings.log_format == "json":
        use_json_logs()
    hide_engine_failures_on_console()  # the CLI prints the reason once; the run log keeps the traceback


def _start_local_cluster(args: argparse.Namespace, settings: Any) -> Any:
    """Start the default LocalCluster on a thread, or return None when another executor is used."""
    if args.executor != "dask" or args.dask_address or settings.dask_address:
        return None
    from concurrent.futures import ThreadPoolExecutor

    from engine.services import open_executor

    pool = ThreadPoolExecutor(1, thread_name_prefix="dask-start")
    prepared = pool.submit(open_executor, "dask", None, settings)
    pool.shutdown(wait=False)
    return prepared


def _close_prepared(prepared: Any) -> None:
    try:
        prepared.result().close()
    except Exception as exc:  # the cluster failed to start: the flow has reported that already
        logging.getLogger("irefine").warning("could not stop the local Dask cluster: %s", exc)


def _run_settings(args: argparse.Namespace) -> Any:
    """The settings of this run: the environment's with --metrics-port and --log-format applied,
    checked first (a port already in use is a BadInput, before anything is written)."""
    import socket

    from engine.settings import load_settings

    flags = {"metrics_port": args.metrics_port, "log_format": args.log_format}
    settings = load_settings().model_copy(update={k: v for k, v in flags.items() if v is not None})
    if settings.metrics_port:
        with socket.socket() as probe:
            try:
                probe.bind((settings.metrics_addr, settings.metrics_port))
            except OSError as exc:
                raise BadInput(
                    f"metrics port {settings.metrics_addr}:{settings.metrics_port}: {exc.strerror or exc}; "
                    "choose another --metrics-port (or IRE_METRICS_PORT)"
                ) from None
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    settings = _run_settings(args)
    from engine.runner import build_job, new_job_id
    from engine.store import JobStore

    # Every check before anything is written: a refused run creates no file and no table.
    job = build_job(args.job_id or new_job_id(), spec)
    store = JobStore.from_settings(settings)
    try:
        store.create_job(job.job_id, spec)
        if not args.quiet:
            print(f"job {job.job_id}: {spec.problem} with {spec.strategy}, batch {spec.batch_size}")
        return _run_flow(job, settings, store, args)
    finally:
        store.close()


def cmd_resume(args: argparse.Namespace) -> int:
    from engine.runner import resume_job
    from engine.store import JobStore
    from irefine.checkpoints import use_deployment_key

    settings = _run_settings(args)
    use_deployment_key()
    store = JobStore.from_settings(settings)
    try:
        job = resume_job(store, args.job_id)  # validates before Prefect starts
        if not args.quiet:
            print(f"job {job.job_id}: resuming at cycle {job.progress.cycles + 1}")
        return _run_flow(job, settings, store, args)
    finally:
        store.close()


def _metrics_line(m: dict[str, Any]) -> str:
    def seconds(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"

    def mib(x: int | None) -> str:
        return "-" if x is None else f"{x / 2**20:,.0f} MiB"

    rate = m["evaluations_per_second"]
    cpu = m["process_cpu_percent"]
    return (
        f"{m['cycle']} took {seconds(m['duration_seconds'])}, "
        f"{'-' if rate is None else f'{rate:,.0f}'} evals/s; "
        f"evaluation p50 {seconds(m['eval_p50_seconds'])}, p95 {seconds(m['eval_p95_seconds'])}, "
        f"max {seconds(m['eval_max_seconds'])}; "
        f"flow CPU {'-' if cpu is None else f'{cpu:.0f}%'}, memory {mib(m['process_rss_bytes'])}; "
        f"workers' memory {mib(m['worker_memory_total_bytes'])} (largest {mib(m['worker_memory_max_bytes'])})"
    )


def _plot_path(path: str) -> str:
    """Check a --plot path before anything is read or written; a BadInput says what to change."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.lower().endswith(".png"):
        raise BadInput(f"--plot {path!r}: the plot is a PNG; give a file name ending in .png")
    if os.path.isdir(path):
        raise BadInput(f"--plot {path!r} is a folder; give a file name ending in .png")
    if not os.path.isdir(folder):
        raise BadInput(f"--plot {path!r}: folder {folder!r} does not exist")
    return path


def _write_plot(path: str, report: Any, cycles: Any) -> None:
    from engine.observe.plot import convergence_png, convergence_series

    series = convergence_series(
        cycles, job_id=report.job_id, problem=report.problem, strategy=report.strategy
    )
    png = convergence_png(series)
    try:
        with open(path, "wb") as fh:
            fh.write(png)
    except OSError as exc:
        raise BadInput(f"--plot {path!r}: {exc.strerror or exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    plot = _plot_path(args.plot) if args.plot else None
    from engine.status import JobStatusReport

    store = _open_store()
    try:
        report = JobStatusReport.read(store, args.job_id)
        cycles = store.cycles(args.job_id) if plot else []
    finally:
        store.close()
    summary = report.model_dump(mode="json")
    if plot:
        _write_plot(plot, report, cycles)
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    for key in (
        "job_id",
        "status",
        "problem",
        "strategy",
        "cycles",
        "evaluations",
        "failed_evaluations",
        "best_score",
        "best_candidate",
        "stop_reason",
        "error",
        "updated_at",
    ):
        if summary[key] is not None:
            print(f"{key:>18}: {summary[key]}")
    if summary["metrics"] is not None:
        print(f"{'last cycle':>18}: {_metrics_line(summary['metrics'])}")
    for a in report.anomalies:
        print(f"{'anomaly':>18}: cycle {a['cycle']} {a['kind']}: {a['message']}")
    if plot:
        print(f"{'plot':>18}: {plot}")
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from irefine.top import run_top

    store = _open_store()
    try:
        run_top(store, once=args.once)
    finally:
        store.close()
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from engine.status import job_summary

    store = _open_store()
    try:
        jobs = store.list_jobs(args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([job_summary(j) for j in jobs]))
        return EXIT_OK
    if not jobs:
        print("no jobs yet: start one with `irefine run --problem sphere`")
    for j in jobs:
        print(
            f"{j.job_id:<28} {j.status.value:<12} {j.spec.problem:<18} {j.spec.strategy:<8} "
            f"cycles {j.cycles:<5} evals {j.evaluations:<7} best {_fmt(j.best_score)}"
        )
    return EXIT_OK


def cmd_problems(args: argparse.Namespace) -> int:
    from engine.problems import PROBLEMS

    for name, text in PROBLEMS.items():
        print(f"{name:<18} {text}")
    print("\nor your own: --problem my_module:MyProblem (see the README)")
    return EXIT_OK


def cmd_strategies(args: argparse.Namespace) -> int:
    from engine.strategies import STRATEGIES

    for name, text in STRATEGIES.items():
        print(f"{name:<8} {text}")
    return EXIT_OK


def _open_cache() -> tuple[Any, Any]:
    from engine.cache import CacheConfig
    from engine.settings import load_settings

    config = CacheConfig.from_settings(load_settings())
    return config, config.open()


def cmd_cache_stats(args: argparse.Namespace) -> int:
    from engine.cache import CacheUnavailableError, RedisCache

    config, cache = _open_cache()
    try:
        stats = cache.stats()
        entries = stats.entries
        if entries is None and isinstance(cache, RedisCache):
            try:
                entries = cache.count()
            except CacheUnavailableError as exc:
                print(f"irefine: {exc}", file=sys.stderr)
                return EXIT_FAILED
    finally:
        cache.close()
    store = _open_store()
    try:
        jobs = store.list_jobs(limit=1_000_000)
    finally:
        store.close()
    hits = sum(j.cached_evaluations for j in jobs)
    misses = sum(j.cache_misses for j in jobs)
    summary = {
        "backend": stats.backend,
        "location": config.redis_url.split("@")[-1]
        if config.redis_url
        else str(config.home / "cache.sqlite"),
        "namespace": config.namespace,
        "entries": entries,
        "memory_bytes": stats.memory_bytes,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>12}: {'-' if value is None else value}")
    return EXIT_OK


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from engine.cache import CacheUnavailableError, key_prefix

    config, cache = _open_cache()
    try:
        prefix = key_prefix(config.namespace, args.problem, args.version)
        removed = cache.clear(prefix)
    except CacheUnavailableError as exc:
        print(f"irefine: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        cache.close()
    what = f"problem {args.problem!r}" if args.problem else f"namespace {config.namespace!r}"
    print(f"removed {removed} cached evaluations of {what}")
    return EXIT_OK


def cmd_setup(args: argparse.Namespace) -> int:
    """Create or update the work pools, queues and limits on the Prefect server (idempotent)."""
    import asyncio

    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise BadInput(
            "setup needs a Prefect server: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from deployments.setup import run_setup
    from engine.settings import load_settings

    try:
        report = asyncio.run(
            run_setup(
                aks_pool=None if args.no_aks else "irefine-aks",
                job_limit=args.job_limit,
                evaluation_limit=args.evaluation_limit,
                submission_rate=args.submission_rate,
                notify_webhook_url=args.notify_webhook or load_settings().notify_webhook_url,
            )
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except Exception as exc:
        print(f"irefine: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for item in report.items:
        print(item.line())
    return EXIT_OK


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: use a port number from 1 to 65535 (0: off)")
    return port


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=["dask", "local"],
        default="dask",
        help="where evaluations run: a Dask cluster (default) or this process (debugging)",
    )
    p.add_argument(
        "--dask-address", help="existing Dask scheduler (default: IRE_DASK_ADDRESS or a LocalCluster)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve Prometheus metrics on this port while the job runs (default: IRE_METRICS_PORT, off)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or one JSON object each (default: IRE_LOG_FORMAT, text)",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irefine",
        description="Run refinement loops (propose, evaluate, keep the best, repeat) on Prefect and Dask.",
        epilog="Exit codes: 0 done, 1 job failed, 2 bad input, 130 interrupted (resume it).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="start a job and run it to its stop rule",
        description="Start a job; flags override the values of the spec file.",
    )
    run.add_argument("spec", nargs="?", help="TOML job spec (keys as the flags, e.g. problem = 'sphere')")
    run.add_argument("--problem", help="built-in problem name (see `irefine problems`) or module:attr")
    run.add_argument("--problem-param", action="append", metavar="K=V", help="problem parameter (repeatable)")
    run.add_argument("--strategy", help="search strategy (see `irefine strategies`; default cmaes)")
    run.add_argument(
        "--strategy-param", action="append", metavar="K=V", help="strategy parameter (repeatable)"
    )
    add_spec_flags(run)
    run.add_argument("--job-id", help="id for the new job (default: a fresh one)")
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted or crashed job from its last checkpoint")
    resume.add_argument("job_id")
    _add_run_flags(resume)
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="show a job's status")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--plot", metavar="FILE.png", help="also write the convergence plot (best score against evaluations)"
    )
    status.set_defaults(func=cmd_status)

    top = sub.add_parser("top", help="live view of the running jobs (Ctrl-C to leave)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=cmd_top)

    lst = sub.add_parser("list", help="list jobs, newest first")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true", help="print a JSON array")
    lst.set_defaults(func=cmd_list)

    cache = sub.add_parser("cache", help="inspect or clear the inference cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="CACHE_COMMAND")
    stats = cache_sub.add_parser("stats", help="entries, memory and hit rate of the inference cache")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=cmd_cache_stats)
    clear = cache_sub.add_parser("clear", help="remove cached evaluations (all of this namespace by default)")
    clear.add_argument("--problem", help="only this problem's entries (name or module:attr)")
    clear.add_argument("--version", help="only this version of --problem")
    clear.set_defaults(func=cmd_cache_clear)

    setup = sub.add_parser(
        "setup",
        help="create the work pools, queues and concurrency limits on the Prefect server",
        description="Create or update, on the server of PREFECT_API_URL, the process pool irefine-local "
        "and the kubernetes pool irefine-aks, each with queues critical/high/normal/low (priorities "
        "1-4), the global limits irefine-running-jobs, irefine-evaluations, irefine-worker-poll (the "
        "turn in which an `irefine worker` polls) and the rate limit irefine-submissions, and the "
        "automations: resume crashed jobs, pause a queue after a burst of failures, deadline and "
        "anomaly alerts (notifying the --notify-webhook URL). Idempotent: a second run reports "
        "everything unchanged.",
    )
    setup.add_argument("--no-aks", action="store_true", help="skip the kubernetes pool irefine-aks")
    setup.add_argument(
        "--job-limit", type=int, default=4, metavar="N", help="jobs running at once (default 4)"
    )
    setup.add_argument(
        "--evaluation-limit",
        type=int,
        default=64,
        metavar="N",
        help="evaluation slots in flight (default 64)",
    )
    setup.add_argument(
        "--submission-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="job submissions a second (default 1.0)",
    )
    setup.add_argument(
        "--notify-webhook",
        metavar="URL",
        help="webhook the alert automations notify (saved as the block irefine-notify; kept for later "
        "runs); default: IRE_NOTIFY_WEBHOOK_URL",
    )
    setup.set_defaults(func=cmd_setup)

    from irefine.submit import add_parser as add_submit_parser

    add_submit_parser(sub)

    from irefine.checkpoints import add_parser as add_checkpoints_parser

    add_checkpoints_parser(sub)

    from irefine.worker import add_parser as add_worker_parser

    add_worker_parser(sub)
    from irefine.server import add_parser as add_server_parser

    add_server_parser(sub)

    from irefine.cluster import add_parser as add_cluster_parser

    add_cluster_parser(sub)

    sub.add_parser("problems", help="list the built-in problems").set_defaults(func=cmd_problems)
    sub.add_parser("strategies", help="list the search strategies").set_defaults(func=cmd_strategies)
    return parser


def _silence_shutdown() -> None:
    # Prefect's ephemeral server prints CancelledError tracebacks while it shuts down at exit
    # (docs/architecture.md section 10). The job's outcome is printed and stored by now; drop that noise.
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run", "resume"):
        # The local server's launcher has Prefect, Dask and the engine imported already.
        from irefine.launcher import delegate, server_root_of

        delegated = delegate(argv, server_root_of(os.environ))
        if delegated is not None:
            sys.exit(delegated)
    USER_ENVIRONMENT.update(os.environ)
    if argv and argv[0] in ("run", "resume") and not {"-h", "--help"} & set(argv):
        # A temporary Prefect API takes seconds to start: launch it first, while this process
        # checks the input, imports the engine and starts its cluster. It writes nothing under
        # IRE_HOME, and a refused run stops it at exit.
        from irefine.server import api_of_this_run

        api_of_this_run()
    from engine.core import EngineError, SpecError

    _quiet_prefect()
    parser = make_parser()
    args = parser.parse_args(argv)
    code = EXIT_OK
    try:
        code = args.func(args)
    except (BadInput, SpecError) as exc:  # a user mistake, wherever it was found: exit code 2
        print(f"irefine: error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except EngineError as exc:  # the store or the cache is unusable: say so in one line
        print(f"irefine: error: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    if "prefect" in sys.modules:
        _silence_shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
