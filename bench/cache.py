"""The inference cache against a real local Redis: cold, warm and resumed jobs, and raw look-ups.

On one 2-worker Dask ``LocalCluster`` and a private ``redis-server``:

- **cold**: CMA-ES on rosenbrock-10 with 20 ms of busy CPU per evaluation, 10 cycles of 100,
  every evaluation computed on the workers (which write each result to the cache);
- **warm**: the same job again under a new id: every candidate must come from the cache;
- **resumed**: the same job in a fresh namespace, crashed right after the workers evaluated the
  cycle after the halfway point (so that cycle is in the cache but not in the store), then resumed
  from the store's last checkpoint with the cycle limit lifted: the replayed cycle must be all hits;
- **concurrent**: the cold job alone in a fresh namespace, then two identical jobs (other ids,
  two processes) started together on another fresh namespace (Redis, then the embedded cache):
  in-flight leases must make them compute each distinct candidate once
  (``concurrent_computed_ratio`` = candidates computed by both / distinct candidates, goal 1.0)
  in about the time of one (``concurrent_wall_ratio`` = wall of both together / wall of one
  alone, goal <= 1.3), both ending with the same best;
- **look-ups**: ``put_many`` / ``get_many`` of 5,000 realistic evaluations, Redis and embedded;
- **flow** (skip with ``--no-flow``): the cold/warm pair through the ``refine`` Prefect flow
  against a Prefect server on a private PostgreSQL.

Progress goes to stderr; the last stdout line is one JSON object. From the repository root::

    .venv/bin/python bench/cache.py              # about 2.5 min
    .venv/bin/python bench/cache.py --quick      # fewer cycles and repetitions
    .venv/bin/python bench/cache.py --no-flow    # engine only, no Prefect/PostgreSQL
    .venv/bin/python bench/cache.py --flow-only  # only the cold/warm pair through the flow
    .venv/bin/python bench/cache.py --profile    # + a pyinstrument profile of one warm run (stderr)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKERS = 2
DIM = 10
COST_MS = 20.0
BATCH = 100
LOOKUP_ENTRIES = 5_000


def log(message: str) -> None:
    print(f"[cache {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def job_spec(cycles: int, *, cost_ms: float = COST_MS, batch: int = BATCH, seed: int = 1) -> Any:
    from engine.core import JobSpec

    return JobSpec.parse(
        {
            "problem": "rosenbrock",
            "problem_params": {"dim": DIM, "cost_ms": cost_ms},
            "strategy": "cmaes",
            "batch_size": batch,
            "max_cycles": cycles,
            "max_evaluations": None,
            "seed": seed,
        }
    )


# -- engine runs ----------------------------------------------------------------------------------


@dataclass
class Timed:
    """One timed job: wall seconds of create_job + run_job (Dask client already connected)."""

    seconds: float
    progress: Any
    connect_s: float

    def summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "s": round(self.seconds, 3),
            "cycles": p.cycles,
            "evaluations": p.evaluations,
            "cached": p.cached,
            "cache_misses": p.cache_misses,
            "best_score": p.best_score,
            "connect_s": round(self.connect_s, 3),
        }


class SimulatedCrash(Exception):
    """Raised by :func:`crash_after_evaluate` to stop a run as a dying flow process would."""


@dataclass
class Bench:
    store: Any
    address: str

    def run(
        self,
        job_id: str,
        spec: Any,
        config: Any,
        *,
        job: Any = None,
        stages: Callable[..., Any] | None = None,
        profiler: Any = None,
    ) -> Timed:
        """Run a new job (or ``job``, already built) to its end and time it."""
        from engine.execution.dask import DaskExecutor
        from engine.runner import call_stage, create_job, run_job

        t0 = time.perf_counter()
        executor = DaskExecutor.start(self.address)
        connect_s = time.perf_counter() - t0
        try:
            with profiler if profiler is not None else contextlib.nullcontext():
                start = time.perf_counter()
                if job is None:
                    job = create_job(self.store, spec, job_id)
                result = run_job(job, self.store, executor, stages=stages or call_stage, cache=config)
                seconds = time.perf_counter() - start
        finally:
            executor.close()
        return Timed(seconds, result.progress, connect_s)


def crash_after_evaluate(cycle: int, seen: dict[str, int]) -> Callable[..., Any]:
    """A stage runner that raises once ``cycle``'s evaluations are done (written to the cache by
    the workers) but before that cycle is recorded; ``seen["misses"]`` gets its computed count."""
    from engine.runner import call_stage

    def stages(stage: str, cycle_no: int, fn: Callable[..., Any], *args: Any) -> Any:
        out = call_stage(stage, cycle_no, fn, *args)
        if stage == "evaluate" and cycle_no == cycle:
            seen["misses"] = out.cache_misses  # the EvaluatedBatch the stage returned
            raise SimulatedCrash(f"simulated crash after evaluating cycle {cycle}")
        return out

    return stages


def engine_runs(bench: Bench, home: Path, redis_url: str, cycles: int, warm_reps: int) -> dict[str, Any]:
    from engine.cache import CacheConfig

    config = CacheConfig(redis_url=redis_url, home=home, namespace="bench")
    spec = job_spec(cycles)

    log("warm-up job (imports, worker problem load)")
    warm_up = CacheConfig(redis_url=redis_url, home=home, namespace="bench-warmup")
    bench.run("warm-up", job_spec(1, batch=4, seed=99), warm_up)

    log(f"cold: {cycles} cycles of {BATCH} x {COST_MS:g} ms on {WORKERS} workers")
    cold = bench.run("cold", spec, config)
    log(f"cold: {cold.summary()}")

    warm: list[Timed] = []
    for rep in range(warm_reps):
        job_id = "warm" if rep == 0 else f"warm-{rep + 1}"
        warm.append(bench.run(job_id, spec, config))
        log(f"{job_id}: {warm[-1].summary()}")
    warm_s = statistics.median(t.seconds for t in warm)
    reevaluations = max(t.progress.cache_misses for t in warm)
    hit_rate = min(t.progress.cached / t.progress.evaluations for t in warm)
    warm_best_equal = all(t.progress.best_score == cold.progress.best_score for t in warm)

    fresh = CacheConfig(redis_url=redis_url, home=home, namespace="bench-resume")
    resume = resumed_run(bench, spec, fresh, cycles)
    resume["best_equal_cold"] = resume["best_score"] == cold.progress.best_score
    log(f"resumed: {resume}")
    return {
        "warm_speedup": round(cold.seconds / warm_s, 1),
        "reevaluations_warm": reevaluations,
        "hit_rate_warm": round(hit_rate, 6),
        "cold_s": round(cold.seconds, 3),
        "warm_s": round(warm_s, 4),
        "resumed_recomputed": resume["recomputed"],
        "warm_best_equal_cold": warm_best_equal,
        "cold": cold.summary(),
        "warm_runs": [t.summary() for t in warm],
        "resume": resume,
    }


def resumed_run(bench: Bench, spec: Any, config: Any, cycles: int) -> dict[str, Any]:
    """Run to the halfway point, crash after evaluating the next cycle, resume to the end."""
    from engine.runner import resume_job
    from engine.store import JobStatus

    half = max(1, cycles // 2)
    crash_cycle = half + 1
    seen: dict[str, int] = {}
    first_spec = spec.model_copy(update={"max_cycles": crash_cycle})
    log(f"resume: job 'half' to cycle {half}, crash after evaluating cycle {crash_cycle}")
    try:
        bench.run("half", first_spec, config, stages=crash_after_evaluate(crash_cycle, seen))
        raise RuntimeError("the simulated crash did not happen")
    except SimulatedCrash:
        pass
    # A real crash leaves the job running in the store, at its last committed checkpoint.
    bench.store.set_status("half", JobStatus.RUNNING)
    job = resume_job(bench.store, "half")
    checkpoint = job.progress
    job.spec = spec  # lift the cycle limit (JobSpec is frozen: a new one on the Job)
    log(f"resume: from cycle {checkpoint.cycles + 1} of {cycles}")
    second = bench.run("half", spec, config, job=job)
    final = second.progress
    computed_before = checkpoint.cache_misses + seen["misses"]  # incl. the uncommitted cycle
    computed_after = final.cache_misses - checkpoint.cache_misses
    needed_new = final.evaluations - computed_before  # candidates never evaluated before the crash
    return {
        "committed_cycles_at_crash": checkpoint.cycles,
        "uncommitted_cycle_computed": seen["misses"],
        "computed_before_crash": computed_before,
        "computed_after_resume": computed_after,
        "needed_new_after_resume": needed_new,
        "recomputed": computed_after - needed_new,
        "cached_after_resume": final.cached - checkpoint.cached,
        "resume_s": round(second.seconds, 3),
        "cycles": final.cycles,
        "best_score": final.best_score,
    }


def _pair_member(
    address: str, db: str, job_id: str, cycles: int, config: Any, ready: Any, go: Any, out: str
) -> None:
    """One of the two concurrent jobs, in a process of its own (pycma draws from numpy's global
    random state, so two CMA-ES jobs in one process would not propose the same candidates)."""
    from engine.execution.dask import DaskExecutor
    from engine.runner import create_job, run_job
    from engine.store import JobStore

    store = JobStore(f"sqlite:///{db}")
    executor = DaskExecutor.start(address)
    job = create_job(store, job_spec(cycles), job_id)
    ready.set()
    go.wait(600)
    started = time.time()
    result = run_job(job, store, executor, cache=config)
    ended = time.time()
    executor.close()
    store.close()
    progress = result.progress
    summary = {"started": started, "ended": ended, "misses": progress.cache_misses}
    Path(out).write_text(json.dumps({**summary, "best": progress.best_score}))


def concurrent_runs(bench: Bench, home: Path, redis_url: str | None, cycles: int) -> dict[str, Any]:
    """One cold job alone, then two identical cold jobs started together (two processes, each with
    its own store and Dask client on the shared cluster), each on a fresh namespace."""
    import multiprocessing

    from engine.cache import CacheConfig

    backend = "redis" if redis_url else "embedded"
    spec = job_spec(cycles)

    def config(name: str) -> Any:
        return CacheConfig(redis_url=redis_url, home=home, namespace=f"bench-{backend}-{name}")

    alone = bench.run(f"alone-{backend}", spec, config("alone"))
    log(f"concurrent ({backend}): one job alone {alone.summary()}")
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Event()
    members = []
    for name in ("left", "right"):
        ready, out = spawn.Event(), home / f"pair-{backend}-{name}.json"
        args = (bench.address, str(home / f"pair-{backend}-{name}.db"), name, cycles, config("together"))
        process = spawn.Process(target=_pair_member, args=(*args, ready, go, str(out)))
        process.start()
        members.append((process, ready, out))
    for _, ready, _ in members:
        ready.wait(600)
    go.set()
    for process, _, _ in members:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a concurrent job exited with {process.exitcode}")
    pair = [json.loads(out.read_text()) for _, _, out in members]
    wall = max(m["ended"] for m in pair) - min(m["started"] for m in pair)
    computed = sum(m["misses"] for m in pair)
    distinct = alone.progress.cache_misses  # the same spec proposes the same candidates
    log(f"concurrent ({backend}): together {wall:.2f} s, {pair}")
    return {
        "concurrent_computed_ratio": round(computed / distinct, 4),
        "concurrent_wall_ratio": round(wall / alone.seconds, 3),
        "concurrent_best_equal": all(m["best"] == alone.progress.best_score for m in pair),
        "alone_s": round(alone.seconds, 3),
        "together_s": round(wall, 3),
        "computed_by_each": [m["misses"] for m in pair],
        "distinct": distinct,
    }


def profile_warm(bench: Bench, home: Path, redis_url: str, cycles: int) -> None:
    """One more warm run under pyinstrument; the profile goes to stderr."""
    from pyinstrument import Profiler

    from engine.cache import CacheConfig

    profiler = Profiler(interval=0.0005)
    config = CacheConfig(redis_url=redis_url, home=home, namespace="bench")
    timed = bench.run("warm-profiled", job_spec(cycles), config, profiler=profiler)
    log(f"profiled warm run: {timed.summary()}")
    print(profiler.output_text(unicode=False, color=False, show_all=False), file=sys.stderr, flush=True)


# -- raw batched look-ups -------------------------------------------------------------------------


def realistic_items(n: int, seed: int = 7) -> list[tuple[str, Any]]:
    """``n`` (key, evaluation) pairs like a model-tuning job's: a score and a few metrics."""
    from engine.cache import cache_key
    from engine.core import Evaluation, fingerprint

    rng = random.Random(seed)
    items = []
    for _ in range(n):
        candidate = {f"x{i}": rng.uniform(-5.0, 10.0) for i in range(DIM)}
        score = rng.uniform(0.0, 1e4)
        metrics = {
            "rmse": rng.random(),
            "mae": rng.random(),
            "n_iter": rng.randrange(10, 500),
            "fold_scores": [rng.random() for _ in range(5)],
        }
        evaluation = Evaluation(score, metrics=metrics, duration=rng.uniform(0.01, 0.03))
        items.append((cache_key("bench-raw", "rosenbrock", "1", fingerprint(candidate)), evaluation))
    return items


def lookup_cost(cache: Any, items: list[tuple[str, Any]], reps: int, put_reps: int = 5) -> dict[str, Any]:
    """Median µs per candidate of put_many of ``items`` (the same keys overwritten each time) and
    of get_many of their keys (all hits), after a first contact that is not timed."""
    keys = [k for k, _ in items]
    cache.get_many(keys[:1])  # connection, schema / maxmemory-policy checks
    put_times = []
    for _ in range(put_reps):
        start = time.perf_counter()
        cache.put_many(items)
        put_times.append(time.perf_counter() - start)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        found = cache.get_many(keys)
        times.append(time.perf_counter() - start)
        if any(ev is None for ev in found):
            raise RuntimeError(f"{cache!r}: {sum(ev is None for ev in found)} misses among stored keys")
    n = len(items)
    return {
        "lookup_us_per_candidate": round(1e6 * statistics.median(times) / n, 2),
        "lookup_us_min": round(1e6 * min(times) / n, 2),
        "put_us_per_candidate": round(1e6 * statistics.median(put_times) / n, 2),
        "batch": n,
        "reps": reps,
        "put_reps": put_reps,
    }


def key_cost(n: int = LOOKUP_ENTRIES, reps: int = 5) -> float:
    """µs per candidate of what the engine does before a look-up: fingerprint + cache_key."""
    from engine.cache import cache_key
    from engine.core import fingerprint

    rng = random.Random(3)
    candidates = [{f"x{i}": rng.uniform(-5.0, 10.0) for i in range(DIM)} for _ in range(n)]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for c in candidates:
            cache_key("bench", "rosenbrock", "1", fingerprint(c))
        times.append(time.perf_counter() - start)
    return round(1e6 * statistics.median(times) / n, 2)


def lookup_runs(redis_url: str, home: Path, reps: int) -> dict[str, Any]:
    from engine.cache import EmbeddedCache, RedisCache

    items = realistic_items(LOOKUP_ENTRIES)
    redis_cache = RedisCache(redis_url, namespace="bench-raw")
    try:
        redis_cost = lookup_cost(redis_cache, items, reps)
    finally:
        redis_cache.close()
    log(f"Redis look-ups: {redis_cost}")
    embedded_cache = EmbeddedCache(home / "embedded-bench.sqlite", namespace="bench-raw")
    try:
        embedded_cost = lookup_cost(embedded_cache, items, reps)
    finally:
        embedded_cache.close()
    log(f"embedded look-ups: {embedded_cost}")
    return {
        "lookup_us_per_candidate": redis_cost["lookup_us_per_candidate"],
        "put_us_per_candidate": redis_cost["put_us_per_candidate"],
        "redis": redis_cost,
        "embedded": embedded_cost,
        "key_us_per_candidate": key_cost(),
    }


# -- the same pair through the Prefect flow -------------------------------------------------------


def flow_runs(address: str, home: Path, redis_url: str, cycles: int) -> dict[str, Any]:
    """Cold then warm ``refine`` flow runs (namespace ``bench-flow``), timed from call to return."""
    os.environ.update(
        {"IRE_HOME": str(home), "IRE_REDIS_URL": redis_url, "IRE_CACHE_NAMESPACE": "bench-flow"}
    )
    for name in ("IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL", "IRE_DASK_ADDRESS"):
        os.environ.pop(name, None)
    from flows.refine import run_refine

    def timed(job_id: str, spec: Any) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        result = run_refine(spec=spec, job_id=job_id, dask_address=address)
        return time.perf_counter() - start, result

    log("flow: warm-up run")
    warm_up_s, _ = timed("flow-warm-up", job_spec(1, batch=4, seed=98))
    spec = job_spec(cycles)
    cold_s, cold = timed("flow-cold", spec)
    log(f"flow cold: {cold_s:.2f} s, misses {cold.cache_misses}")
    warm_s, warm = timed("flow-warm", spec)
    log(f"flow warm: {warm_s:.3f} s, misses {warm.cache_misses}, cached {warm.cached_evaluations}")
    return {
        "warm_speedup_flow": round(cold_s / warm_s, 1),
        "flow": {
            "cold_s": round(cold_s, 3),
            "warm_s": round(warm_s, 3),
            "warm_up_s": round(warm_up_s, 3),  # a 1-cycle run of 4 free-ish evaluations
            "reevaluations_warm": warm.cache_misses,
            "hit_rate_warm": round(warm.cached_evaluations / warm.evaluations, 6),
            "best_equal_cold": warm.best_score == cold.best_score,
        },
    }


# -- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_api(startup_timeout: float) -> Any:
    """``tests.prefect_server.prefect_api_on_postgres`` with a longer start-up bound: on a loaded
    machine the server can take minutes to answer."""
    from tests.prefect_server import PrefectServer, drain_prefect
    from tests.services import PostgresServer

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresServer())
        server = PrefectServer(postgres.new_database(), startup_timeout=startup_timeout)
        stack.callback(server.close)
        os.environ["PREFECT_API_URL"] = server.url
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        stack.callback(drain_prefect)
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cycles, fewer repetitions")
    parser.add_argument("--no-flow", action="store_true", help="skip the Prefect flow pair")
    parser.add_argument("--profile", action="store_true", help="profile one warm run (pyinstrument)")
    parser.add_argument("--flow-only", action="store_true", help="only the Prefect flow pair")
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    cycles = 4 if args.quick else 10
    report: dict[str, Any] = {"bench": "cache"}

    from distributed import LocalCluster

    from engine.store import JobStore
    from tests.services import RedisServer

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ire-bench-cache-")))
        if not args.no_flow:
            log("starting PostgreSQL and the Prefect server")
            stack.enter_context(prefect_api(startup_timeout=600))
        redis_server = stack.enter_context(RedisServer())
        log(f"Redis at {redis_server.url}; starting the Dask cluster")
        cluster = stack.enter_context(
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0")
        )
        address = str(cluster.scheduler_address)
        store = JobStore(f"sqlite:///{tmp / 'bench.db'}")
        stack.callback(store.close)
        bench = Bench(store, address)

        if not args.flow_only:
            engine = engine_runs(bench, tmp, redis_server.url, cycles, warm_reps=3 if args.quick else 5)
            concurrent = concurrent_runs(bench, tmp, redis_server.url, cycles)
            log(f"concurrent (redis): {concurrent}")
            concurrent_embedded = concurrent_runs(bench, tmp, None, cycles)
            log(f"concurrent (embedded): {concurrent_embedded}")
            if args.profile:
                profile_warm(bench, tmp, redis_server.url, cycles)
            lookups = lookup_runs(redis_server.url, tmp, reps=10 if args.quick else 20)
        flow = {} if args.no_flow else flow_runs(address, tmp / "flow-home", redis_server.url, cycles)

    if args.flow_only:
        report.update({"warm_speedup_flow": flow.pop("warm_speedup_flow", None), **flow, "cycles": cycles})
        print(json.dumps(report), flush=True)
        return
    report.update(
        {
            "warm_speedup": engine.pop("warm_speedup"),
            "reevaluations_warm": engine.pop("reevaluations_warm"),
            "lookup_us_per_candidate": lookups.pop("lookup_us_per_candidate"),
            "hit_rate_warm": engine.pop("hit_rate_warm"),
            "cold_s": engine.pop("cold_s"),
            "warm_s": engine.pop("warm_s"),
            "resumed_recomputed": engine.pop("resumed_recomputed"),
            "put_us_per_candidate": lookups.pop("put_us_per_candidate"),
            "embedded": lookups.pop("embedded"),
            "warm_speedup_flow": flow.pop("warm_speedup_flow", None),
            "concurrent_computed_ratio": concurrent.pop("concurrent_computed_ratio"),
            "concurrent_wall_ratio": concurrent.pop("concurrent_wall_ratio"),
            "concurrent": concurrent,
            "concurrent_embedded": concurrent_embedded,
            **engine,
            **lookups,
            **flow,
            "cycles": cycles,
            "batch": BATCH,
            "cost_ms": COST_MS,
            "workers": WORKERS,
            "quick": args.quick,
            "machine_cpus": os.cpu_count(),
        }
    )
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
