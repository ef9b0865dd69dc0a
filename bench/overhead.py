"""Engine + Prefect overhead against a raw Dask ask/tell loop on the same cluster.

Two cases, each run alternately as (a) a plain loop over ``client.map`` with the engine's own
strategy and sharding, and (b) the ``refine`` flow against a real Prefect server on PostgreSQL:

- ``cheap``: CMA-ES on rosenbrock-10, 50 cycles of 5,000 free (vectorised) evaluations;
- ``20ms``: the same with 20 ms of busy CPU per evaluation, 20 cycles of 200.

Then ``irefine run`` is timed from launch to its first committed cycle: with the Prefect server
on PostgreSQL, with the local server of ``irefine server start`` (``first_cycle_s_local_server``)
and with the temporary API a run starts without either (``first_cycle_s_embedded``). The last line
on stdout is one JSON object; progress goes to stderr. Run from the repository root::

    .venv/bin/python bench/overhead.py                 # 3 repetitions, ~12 minutes
    .venv/bin/python bench/overhead.py --quick         # 1 repetition, fewer cycles, ~2 minutes
    .venv/bin/python bench/overhead.py --first-cycle   # only the last two start-up figures
    .venv/bin/python bench/overhead.py --skip-cases --long --concurrent 8   # long and many jobs, ~20 minutes

``--long`` and ``--concurrent N`` are described in ``bench/overhead_scale.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import overhead_scale  # noqa: E402 - beside this file (bench/ is on sys.path when run as a script)

WORKERS = 2
PROBLEM = "rosenbrock"
STRATEGY = "cmaes"
STAGES = ("propose", "evaluate", "record")


@dataclass(frozen=True)
class Case:
    """One benchmark job: ``cycles`` cycles of ``batch`` evaluations costing ``cost_ms`` each.

    Repetition ``i`` uses seed ``seed + i`` on both sides. Seeds differ between cases and runs so
    that no engine run finds another run's evaluations in the inference cache (on by default for
    costly evaluations; its keys do not include ``cost_ms``).
    """

    name: str
    cost_ms: float
    batch: int
    cycles: int
    seed: int

    @property
    def problem_params(self) -> dict[str, Any]:
        return {"dim": 10, "cost_ms": self.cost_ms}


CASES = (Case("cheap", 0.0, 5000, 50, seed=1), Case("20ms", 20.0, 200, 20, seed=101))
QUICK_CYCLES = {"cheap": 10, "20ms": 5}


@dataclass
class Run:
    """One timed run: its wall time, evaluation seconds and per-stage seconds summed over cycles;
    ``cached`` counts evaluations an engine run took from the cache (0 in a fair comparison)."""

    wall: float
    cycles: int
    eval_seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    cached: int = 0
    server_cpu: float = 0.0

    def efficiency(self, workers: int) -> float:
        """Evaluation time / (wall time x workers): the share of the workers' time spent evaluating."""
        return self.eval_seconds / (self.wall * workers)


def server_excess_ms(baseline: Run, engine: Run) -> float:
    """Server CPU ms a cycle the engine run caused: its server CPU less what the server used
    idle (its rate during the paired baseline run, over the engine run's wall time)."""
    idle = baseline.server_cpu / baseline.wall * engine.wall
    return 1000 * (engine.server_cpu - idle) / engine.cycles


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- (a) the raw Dask loop ------------------------------------------------------------------------


def run_baseline(client: Any, case: Case, seed: int, cycles: int) -> Run:
    """The loop a raw-Dask user writes with our building blocks: ask, map shards, gather, tell."""
    from engine.execution.base import ProblemRef, evaluate_shard, split_shards
    from engine.problems import load_problem, problem_space
    from engine.strategies import make_strategy

    stages: dict[str, float] = defaultdict(float)
    eval_seconds = 0.0
    clock = time.perf_counter
    start = clock()
    problem = load_problem(PROBLEM, case.problem_params)
    strategy = make_strategy(STRATEGY, problem_space(problem), seed, {})
    ref = ProblemRef(PROBLEM, case.problem_params)
    threads = sum(client.nthreads().values())
    for _ in range(cycles):
        t0 = clock()
        candidates = strategy.ask(case.batch)
        t1 = clock()
        shards = split_shards(candidates, threads)
        futures = client.map(evaluate_shard, [ref] * len(shards), shards, pure=False)
        evaluations = [e for shard in client.gather(futures) for e in shard]
        t2 = clock()
        strategy.tell(candidates, [e.score for e in evaluations])
        t3 = clock()
        stages["propose"] += t1 - t0
        stages["evaluate"] += t2 - t1
        stages["record"] += t3 - t2
        eval_seconds += sum(e.duration for e in evaluations)
    return Run(clock() - start, cycles, eval_seconds, dict(stages))


# -- (b) the engine through its Prefect flow ------------------------------------------------------


@contextlib.contextmanager
def stage_clock() -> Iterator[dict[str, float]]:
    """Time each stage of the flow's cycles: ``<stage>`` as a Prefect task and ``<stage>_body``
    inside it (the engine's own work), summed over cycles.

    It wraps ``flows.refine.prefect_stage`` and the stage functions of ``engine.runner``, which
    the flow and ``run_job`` look up at call time; the wrappers add microseconds a cycle.
    """
    import engine.runner as runner
    import flows.refine as refine_module

    totals: dict[str, float] = defaultdict(float)
    clock = time.perf_counter

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = clock()
            try:
                return fn(*args)
            finally:
                totals[name] += clock() - start

        return wrapper

    original_stage = refine_module.prefect_stage

    class TimedStages:
        def __call__(self, stage: str, cycle: int, fn: Callable[..., Any], *args: Any) -> Any:
            start = clock()
            try:
                return original_stage(stage, cycle, fn, *args)
            finally:
                totals[stage] += clock() - start

        def submit(self, stage: str, cycle: int, fn: Callable[..., Any], *args: Any) -> Any:
            # A stage submitted ahead (pipelined cycles) overlaps others: only its body is timed.
            return original_stage.submit(stage, cycle, fn, *args)

    prefect_stage = TimedStages()
    originals = {name: getattr(runner, name) for name in STAGES}
    refine_module.prefect_stage = prefect_stage  # type: ignore[assignment]
    for name, fn in originals.items():
        setattr(runner, name, timed(f"{name}_body", fn))
    try:
        yield totals
    finally:
        refine_module.prefect_stage = original_stage  # type: ignore[assignment]
        for name, fn in originals.items():
            setattr(runner, name, fn)


def run_engine(case: Case, seed: int, cycles: int, dask_address: str) -> Run:
    """The same job as one ``refine`` flow run, called as the CLI calls it (``run_refine``: Prefect's
    flow heartbeat off); timed from the call to its return."""
    from engine.core import JobSpec
    from engine.settings import load_settings
    from engine.store import JobStore
    from flows.refine import run_refine

    job_id = f"bench-{case.name}-{uuid.uuid4().hex[:8]}"
    spec = JobSpec.parse(
        {
            "problem": PROBLEM,
            "problem_params": case.problem_params,
            "strategy": STRATEGY,
            "batch_size": case.batch,
            "seed": seed,
            "max_cycles": cycles,
            "max_evaluations": None,
        }
    )
    with stage_clock() as stages:
        start = time.perf_counter()
        result = run_refine(spec=spec, job_id=job_id, dask_address=dask_address)
        wall = time.perf_counter() - start
    if result.cycles != cycles:
        raise RuntimeError(f"engine run {job_id} ran {result.cycles} cycles, not {cycles}: {result}")
    if result.cached_evaluations:
        log(f"warning: engine run {job_id} took {result.cached_evaluations} evaluations from the cache")
    store = JobStore.from_settings(load_settings())
    try:
        eval_seconds = sum(c.eval_seconds for c in store.cycles(job_id, fresh=True))
    finally:
        store.close()
    return Run(wall, cycles, eval_seconds, dict(stages), cached=result.cached_evaluations)


# -- one case: alternate the two, report medians --------------------------------------------------


def per_cycle_ms(runs: list[Run], key: str) -> float:
    return statistics.median(1000 * r.stages.get(key, 0.0) / r.cycles for r in runs)


def stage_report(baseline: list[Run], engine: list[Run]) -> dict[str, Any]:
    """Median ms a cycle by stage: baseline, engine task (outer), engine body, task overhead."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        task_ms = per_cycle_ms(engine, stage)
        body_ms = per_cycle_ms(engine, f"{stage}_body")
        out[stage] = {
            "baseline": round(per_cycle_ms(baseline, stage), 2),
            "engine_task": round(task_ms, 2),
            "engine_body": round(body_ms, 2),
            "prefect_task_overhead": round(task_ms - body_ms, 2),
        }
    # Everything outside the cycles: flow run creation and exit, job creation, Dask connect, flush.
    fixed = [r.wall - sum(r.stages.get(s, 0.0) for s in STAGES) for r in engine]
    out["engine_outside_stages_s"] = round(statistics.median(fixed), 3)
    return out


def measure_case(
    client: Any,
    case: Case,
    reps: int,
    cycles: int,
    dask_address: str,
    server_cpu_seconds: Callable[[], float],
) -> dict[str, Any]:
    baseline: list[Run] = []
    engine: list[Run] = []
    for rep in range(reps):
        seed = case.seed + rep  # both sides of a pair do identical work
        order = ("baseline", "engine") if rep % 2 == 0 else ("engine", "baseline")
        for side in order:
            server_before = server_cpu_seconds()
            if side == "baseline":
                baseline.append(run_baseline(client, case, seed, cycles))
                baseline[-1].server_cpu = server_cpu_seconds() - server_before
                log(f"{case.name} rep {rep + 1}: baseline {baseline[-1].wall:.2f} s")
            else:
                engine.append(run_engine(case, seed, cycles, dask_address))
                engine[-1].server_cpu = server_cpu_seconds() - server_before
                log(f"{case.name} rep {rep + 1}: engine   {engine[-1].wall:.2f} s")
    ratios = [e.wall / b.wall for b, e in zip(baseline, engine, strict=True)]
    return {
        "cycles": cycles,
        "batch": case.batch,
        "baseline_s": [round(r.wall, 3) for r in baseline],
        "engine_s": [round(r.wall, 3) for r in engine],
        "ratios": [round(r, 3) for r in ratios],
        "ratio": round(statistics.median(ratios), 3),
        "cycle_ms_baseline": round(statistics.median(1000 * r.wall / r.cycles for r in baseline), 2),
        "cycle_ms_engine": round(statistics.median(1000 * r.wall / r.cycles for r in engine), 2),
        "efficiency_engine": [round(r.efficiency(WORKERS), 3) for r in engine],
        "efficiency_baseline": [round(r.efficiency(WORKERS), 3) for r in baseline],
        "engine_cached": [r.cached for r in engine],
        "server_excess_cpu_ms_per_cycle": round(
            statistics.median(server_excess_ms(b, e) for b, e in zip(baseline, engine, strict=True)), 1
        ),
        "stages_ms_per_cycle": stage_report(baseline, engine),
    }


def warm_up(client: Any, dask_address: str) -> None:
    """One short run of each side, so that imports, worker problem caches and Prefect's client
    setup are not charged to the first measured run (`first_cycle_s` measures a cold start)."""
    case = Case("warm-up", 0.0, 200, 2, seed=1000)
    run_baseline(client, case, case.seed, case.cycles)
    run_engine(case, case.seed, case.cycles, dask_address)


# -- time from `irefine run` to its first committed cycle -----------------------------------------


def committed_cycles(db_path: Path, job_id: str) -> int:
    """The job's committed cycles as the store's SQLite file says; 0 until the job row exists."""
    if not db_path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=1)) as conn:
            row = conn.execute("select cycles from jobs where id = ?", (job_id,)).fetchone()
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return 0
    return int(row[0]) if row else 0


def first_cycle_seconds(env: dict[str, str], label: str, seed: int) -> float:
    """Seconds from launching ``irefine run`` to its first committed cycle; waits for it to end."""
    job_id = f"bench-first-{label}-{uuid.uuid4().hex[:8]}"
    db_path = Path(env["IRE_HOME"]) / "irefine.db"
    cmd = [
        sys.executable, "-m", "irefine", "run", "--problem", PROBLEM, "--problem-param", "dim=10",
        "--batch-size", "200", "--max-cycles", "3", "--seed", str(seed), "--job-id", job_id, "-q",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            while committed_cycles(db_path, job_id) < 1:
                if proc.poll() is not None and committed_cycles(db_path, job_id) < 1:
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or committed_cycles(db_path, job_id) < 1:
            output.seek(0)
            tail = output.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"irefine run ({label}) exited {code}: {tail or '(no output)'}")
    return elapsed


_CLI_SEEDS = itertools.count(2001)  # a new seed for every launch: no cycle comes from the cache


def first_cycle_runs(env: dict[str, str], label: str, reps: int) -> dict[str, Any]:
    """``reps`` timed ``irefine run`` launches: their median, each run, and the errors of failed ones."""
    times: list[float] = []
    errors: list[str] = []
    for rep in range(reps):
        try:
            times.append(first_cycle_seconds(env, label, next(_CLI_SEEDS)))
            log(f"first cycle ({label}) run {rep + 1}: {times[-1]:.2f} s")
        except RuntimeError as exc:  # reported in the JSON: one failed launch must not lose the rest
            errors.append(str(exc)[-500:])
            log(f"first cycle ({label}) run {rep + 1} failed: {exc}")
    median = round(statistics.median(times), 3) if times else None
    return {"median": median, "runs": [round(t, 3) for t in times], "errors": errors}


def measure_first_cycle(reps: int, dask_address: str) -> dict[str, Any]:
    """The CLI with the Prefect server, with a running Dask scheduler too, and without a server
    of its own (the local server of `irefine server start`, then the temporary API)."""
    served = {k: v for k, v in os.environ.items() if k != "IRE_DASK_ADDRESS"}
    out = {
        "server": first_cycle_runs(served, "server", reps),
        # Without the CLI's own LocalCluster start: connected to the benchmark's cluster.
        "existing_dask": first_cycle_runs({**served, "IRE_DASK_ADDRESS": dask_address}, "existing-dask", 1),
    }
    return {**out, **measure_without_api(served, reps)}


def import_baseline_seconds(env: dict[str, str]) -> float:
    """Seconds a fresh interpreter takes to import Prefect and Dask's distributed: the floor of
    any CLI start on this machine at this moment (the figures below are also given against it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import prefect, distributed"], env=env, check=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def local_server(env: dict[str, str]) -> Iterator[None]:
    """``irefine server start`` (SQLite, under env's IRE_HOME) for the block; stopped after."""
    from tests.prefect_server import free_port

    def irefine_server(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "irefine", "server", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    started = irefine_server("start", "--port", str(free_port()))
    try:
        if started.returncode != 0:
            raise RuntimeError(f"irefine server start failed: {started.stdout}{started.stderr}")
        yield
    finally:
        irefine_server("stop")


def measure_without_api(base_env: dict[str, str], reps: int) -> dict[str, Any]:
    """``irefine run`` without PREFECT_API_URL: with the local server running, then with the
    temporary API (a fresh PREFECT_HOME: its first launch also creates and migrates Prefect's
    database, a user's first run; the later ones find it ready). Each launch is paired with an
    import baseline run just before it."""
    env = {k: v for k, v in base_env.items() if k != "PREFECT_API_URL"}
    out: dict[str, Any] = {}
    baselines: list[float] = []

    def runs(run_env: dict[str, str], label: str, count: int) -> dict[str, Any]:
        baselines.append(import_baseline_seconds(run_env))
        result = first_cycle_runs(run_env, label, count)
        result["ratio_to_import_baseline"] = (
            round(result["median"] / baselines[-1], 2) if result["median"] is not None else None
        )
        return result

    with local_server(env):
        out["local_server"] = runs(env, "local-server", reps)
    with tempfile.TemporaryDirectory(prefix="ire-bench-prefect-home-") as prefect_home:
        embedded = {**env, "PREFECT_HOME": prefect_home}
        out["embedded_first_use"] = runs(embedded, "embedded-first-use", 1)
        out["embedded"] = runs(embedded, "embedded", reps)
    out["import_baseline_s"] = [round(b, 3) for b in baselines]
    return out


def first_cycle_report(first: dict[str, Any]) -> dict[str, Any]:
    """The start-up figures of the report (issue 16's goals: 3.5 s local server, 6 s embedded)."""
    return {
        "first_cycle_s_local_server": first["local_server"]["median"],
        "first_cycle_s_embedded": first["embedded"]["median"],
        "first_cycle_s_embedded_first_use": first["embedded_first_use"]["median"],
        "first_cycle_ratio_to_import_baseline": {
            key: first[key]["ratio_to_import_baseline"] for key in ("local_server", "embedded")
        },
        "load_average_1m": round(os.getloadavg()[0], 1),
    }


def main_first_cycle_only(reps: int) -> None:
    """Only the start-up of ``irefine run`` without a Prefect API of its own: no PostgreSQL, no
    benchmark cluster (each launch starts its own LocalCluster, as a user's does)."""
    with tempfile.TemporaryDirectory(prefix="ire-bench-home-") as ire_home:
        env = {**os.environ, "IRE_HOME": ire_home}
        for name in ("IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL", "IRE_DASK_ADDRESS", "PREFECT_API_URL"):
            env.pop(name, None)
        first = measure_without_api(env, reps)
    report = {"bench": "overhead", "mode": "first-cycle", **first_cycle_report(first), "first_cycle": first}
    print(json.dumps(report), flush=True)


# -- services -------------------------------------------------------------------------------------


@contextlib.contextmanager
def services() -> Iterator[tuple[Any, str, Callable[[], float]]]:
    """A Prefect server on a private PostgreSQL, fresh IRE_HOME and PREFECT_HOME, and a 2-worker
    Dask cluster.

    Yields ``(client, scheduler_address, server_cpu_seconds)``; everything is stopped and removed
    on exit.
    """
    import psutil

    from tests.prefect_server import prefect_api_on_postgres

    with contextlib.ExitStack() as stack:
        ire_home = stack.enter_context(tempfile.TemporaryDirectory(prefix="ire-bench-home-"))
        os.environ["IRE_HOME"] = ire_home
        # Prefect's local files (result storage of the describe-problem task) go here, not to ~.
        prefect_home = stack.enter_context(tempfile.TemporaryDirectory(prefix="ire-bench-prefect-home-"))
        os.environ["PREFECT_HOME"] = prefect_home
        for name in ("IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL", "IRE_DASK_ADDRESS"):
            os.environ.pop(name, None)
        log("starting PostgreSQL and the Prefect server")
        server = stack.enter_context(prefect_api_on_postgres())
        server_process = psutil.Process(server.process.pid)

        def server_cpu_seconds() -> float:
            """CPU seconds the Prefect server has used so far (it shares the workers' cores)."""
            times = server_process.cpu_times()
            return float(times.user + times.system)

        from distributed import Client, LocalCluster

        log("starting the Dask cluster")
        cluster = stack.enter_context(
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0")
        )
        client = stack.enter_context(Client(cluster))
        yield client, str(cluster.scheduler_address), server_cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition and fewer cycles")
    parser.add_argument(
        "--first-cycle",
        action="store_true",
        help="only the start-up figures of `irefine run` with the local server and the temporary API",
    )
    parser.add_argument("--long", action="store_true", help="also one job of 2,000 cycles: late vs early")
    parser.add_argument("--concurrent", type=int, metavar="N", help="also N jobs at once on one cluster")
    parser.add_argument("--skip-cases", action="store_true", help="only --long/--concurrent (no ratios)")
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if args.first_cycle:
        main_first_cycle_only(1 if args.quick else 3)
        return
    from deployments.server import SERVER_SETTINGS

    reps = 1 if args.quick else 3
    report: dict[str, Any] = {"bench": "overhead"}
    with services() as (client, address, server_cpu_seconds):
        log(f"Dask scheduler {address}; warming up")
        warm_up(client, address)
        results: dict[str, Any] = {}
        for case in () if args.skip_cases else CASES:
            cycles = QUICK_CYCLES[case.name] if args.quick else case.cycles
            log(f"case {case.name}: {cycles} cycles of {case.batch}, cost_ms={case.cost_ms:g}, {reps} reps")
            results[case.name] = measure_case(client, case, reps, cycles, address, server_cpu_seconds)
            log(f"case {case.name}: {json.dumps(results[case.name])}")
        scale: dict[str, Any] = {}
        if args.long:
            scale["long"] = overhead_scale.measure_long(client, address, overhead_scale.engine_env())
            scale["late_to_early_overhead"] = scale["long"]["late_to_early_overhead"]
            log(f"long: {json.dumps(scale['long'])}")
        if args.concurrent:
            scale["concurrent"] = overhead_scale.measure_concurrent(
                client, address, overhead_scale.engine_env(), args.concurrent, server_cpu_seconds
            )
            scale["concurrent_efficiency"] = scale["concurrent"]["concurrent_efficiency"]
            log(f"concurrent: {json.dumps(scale['concurrent'])}")
        if args.skip_cases:
            print(json.dumps({**report, **scale}), flush=True)
            return
        first = measure_first_cycle(reps, address)
    report.update(
        {
            "ratio_cheap": results["cheap"]["ratio"],
            "ratio_20ms": results["20ms"]["ratio"],
            "efficiency_20ms": statistics.median(results["20ms"]["efficiency_engine"]),
            "first_cycle_s": first["server"]["median"],
            **first_cycle_report(first),
            "first_cycle_s_existing_dask": first["existing_dask"]["median"],
            **results,
            **scale,
            "first_cycle": first,
            "server_settings": dict(SERVER_SETTINGS),
            "quick": args.quick,
            "workers": WORKERS,
            "machine_cpus": os.cpu_count(),
        }
    )
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
