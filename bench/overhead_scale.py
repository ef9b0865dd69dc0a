"""``bench/overhead.py --long`` and ``--concurrent N``: the engine's overhead as jobs grow long and many.

- ``--long``: one job of 2,000 cycles of 200 cheap evaluations (CMA-ES on rosenbrock-10), run as
  ``irefine run`` against a running Prefect server, beside a raw Dask loop of the same cycles on
  the same cluster. Each side's cycle time is read over cycles 10-110 (early) and 1,900-2,000
  (late): the engine's from its cycles' commit times in the store, the loop's from its own clock.
  ``late_to_early_overhead`` is the engine's late overhead over the loop divided by its early one
  (goal <= 1.2: store rows, checkpoints, artifacts, the detector's history and the UI's task list
  must not make late cycles dearer). Also the store's size per 1,000 cycles.
- ``--concurrent N``: N jobs at once (``irefine run`` processes, 20 ms evaluations) on one Dask
  cluster and one Prefect server, against N raw ``client.map`` loops (threads) sharing the same
  cluster. ``concurrent_efficiency`` is the engine's aggregate evaluation efficiency (evaluation
  seconds / (wall x workers)) over the loops' (goal >= 0.90); the server's CPU per cycle is reported.

Both are called from ``bench/overhead.py`` with the services it starts.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

LONG_CYCLES = 2000
LONG_BATCH = 200
EARLY = (10, 110)
LATE = (1900, 2000)
CONCURRENT_CYCLES = 50
CONCURRENT_BATCH = 40
PROBLEM_PARAMS = {"dim": 10}


def _log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _raw_loop(client: Any, seed: int, cycles: int, batch: int, cost_ms: float) -> tuple[list[float], float]:
    """A raw Dask ask/map/gather/tell loop: the end time of every cycle, and evaluation seconds."""
    from engine.execution.base import ProblemRef, evaluate_shard, split_shards
    from engine.problems import load_problem, problem_space
    from engine.strategies import make_strategy

    params = {**PROBLEM_PARAMS, "cost_ms": cost_ms}
    problem = load_problem("rosenbrock", params)
    strategy = make_strategy("cmaes", problem_space(problem), seed, {})
    ref = ProblemRef("rosenbrock", params)
    threads = sum(client.nthreads().values())
    ends: list[float] = []
    eval_seconds = 0.0
    for _ in range(cycles):
        candidates = strategy.ask(batch)
        shards = split_shards(candidates, threads)
        futures = client.map(evaluate_shard, [ref] * len(shards), shards, pure=False)
        evaluations = [e for shard in client.gather(futures) for e in shard]
        strategy.tell(candidates, [e.score for e in evaluations])
        eval_seconds += sum(e.duration for e in evaluations)
        ends.append(time.perf_counter())
    return ends, eval_seconds


def _engine_cmd(seed: int, cycles: int, batch: int, cost_ms: float, address: str, job_id: str) -> list[str]:
    return [
        sys.executable, "-m", "irefine", "run", "--problem", "rosenbrock",
        "--problem-param", f"dim={PROBLEM_PARAMS['dim']}", "--problem-param", f"cost_ms={cost_ms:g}",
        "--strategy", "cmaes", "--batch-size", str(batch), "--max-cycles", str(cycles),
        "--max-evaluations", str(cycles * batch), "--seed", str(seed), "--cache", "off",
        "--dask-address", address, "--job-id", job_id, "-q",
    ]  # fmt: skip


def _run_engine(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"irefine run exited {done.returncode}:\n{tail}")


def _cycle_rows(db: Path, job_id: str) -> list[tuple[int, datetime, float]]:
    """(cycle, commit time, evaluation seconds) of the job's committed cycles, from the SQLite store."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT cycle, finished_at, eval_seconds FROM cycles WHERE job_id = ? ORDER BY cycle", (job_id,)
        ).fetchall()
    return [(int(c), datetime.fromisoformat(str(t)), float(e or 0.0)) for c, t, e in rows]


def _window_ms(times: dict[int, float], window: tuple[int, int]) -> float:
    """Mean milliseconds a cycle over cycles ``window[0]+1 .. window[1]``."""
    first, last = window
    return 1000 * (times[last] - times[first]) / (last - first)


def measure_long(client: Any, address: str, env_base: dict[str, str], seed: int = 7) -> dict[str, Any]:
    """One 2,000-cycle engine job and the same raw loop; early and late per-cycle overheads."""
    home = Path(tempfile.mkdtemp(prefix="ire-bench-long-"))
    env = {**env_base, "IRE_HOME": str(home)}
    job_id = f"bench-long-{seed}"
    _log(f"long: raw loop of {LONG_CYCLES} cycles of {LONG_BATCH}")
    ends, _ = _raw_loop(client, seed, LONG_CYCLES, LONG_BATCH, 0.0)
    raw = {i + 1: t for i, t in enumerate(ends)}
    _log(f"long: engine job of {LONG_CYCLES} cycles of {LONG_BATCH}")
    started = time.perf_counter()
    _run_engine(_engine_cmd(seed, LONG_CYCLES, LONG_BATCH, 0.0, address, job_id), env)
    wall = time.perf_counter() - started
    rows = _cycle_rows(home / "irefine.db", job_id)
    if len(rows) != LONG_CYCLES:
        raise RuntimeError(f"long: the engine committed {len(rows)} cycles, not {LONG_CYCLES}")
    committed = {c: t.timestamp() for c, t, _ in rows}
    early_engine, late_engine = _window_ms(committed, EARLY), _window_ms(committed, LATE)
    early_raw, late_raw = _window_ms(raw, EARLY), _window_ms(raw, LATE)
    early_over, late_over = early_engine - early_raw, late_engine - late_raw
    store_bytes = sum(p.stat().st_size for p in home.glob("irefine.db*"))
    return {
        "late_to_early_overhead": round(late_over / early_over, 3) if early_over > 0 else None,
        "cycle_ms": {
            "engine_early": round(early_engine, 2),
            "engine_late": round(late_engine, 2),
            "raw_early": round(early_raw, 2),
            "raw_late": round(late_raw, 2),
            "overhead_early": round(early_over, 2),
            "overhead_late": round(late_over, 2),
        },
        "store_bytes_per_1000_cycles": round(store_bytes * 1000 / LONG_CYCLES),
        "engine_wall_s": round(wall, 1),
        "cycles": LONG_CYCLES,
        "batch": LONG_BATCH,
    }


def measure_concurrent(
    client: Any, address: str, env_base: dict[str, str], jobs: int, server_cpu_seconds: Callable[[], float]
) -> dict[str, Any]:
    """``jobs`` engine jobs at once against ``jobs`` raw loops at once, on the same cluster."""
    workers = sum(client.nthreads().values())
    cost_ms = 20.0
    _log(f"concurrent: {jobs} raw loops of {CONCURRENT_CYCLES} cycles of {CONCURRENT_BATCH}")
    results: list[float] = [0.0] * jobs

    def loop(i: int) -> None:
        results[i] = _raw_loop(client, 500 + i, CONCURRENT_CYCLES, CONCURRENT_BATCH, cost_ms)[1]

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw_wall = time.perf_counter() - started
    raw_efficiency = sum(results) / (raw_wall * workers)

    _log(f"concurrent: {jobs} engine jobs at once")
    home = Path(tempfile.mkdtemp(prefix="ire-bench-concurrent-"))
    env = {**env_base, "IRE_HOME": str(home)}
    # One job first creates the store's tables, so the N processes do not race to create them.
    _run_engine(_engine_cmd(499, 1, 8, 0.0, address, "bench-concurrent-warm"), env)
    cpu_before = server_cpu_seconds()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            _engine_cmd(500 + i, CONCURRENT_CYCLES, CONCURRENT_BATCH, cost_ms, address, f"bench-conc-{i}"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(jobs)
    ]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    engine_wall = time.perf_counter() - started
    server_cpu = server_cpu_seconds() - cpu_before
    if errors:
        raise RuntimeError(f"{len(errors)} engine jobs failed: {errors[0][-2000:]}")
    db = home / "irefine.db"
    eval_seconds = sum(e for i in range(jobs) for _, _, e in _cycle_rows(db, f"bench-conc-{i}"))
    engine_efficiency = eval_seconds / (engine_wall * workers)
    cycles = jobs * CONCURRENT_CYCLES
    return {
        "concurrent_efficiency": round(engine_efficiency / raw_efficiency, 3),
        "engine_efficiency": round(engine_efficiency, 3),
        "raw_efficiency": round(raw_efficiency, 3),
        "engine_wall_s": round(engine_wall, 1),
        "raw_wall_s": round(raw_wall, 1),
        "server_cpu_ms_per_cycle": round(1000 * server_cpu / cycles, 1),
        "jobs": jobs,
        "cycles_per_job": CONCURRENT_CYCLES,
        "batch": CONCURRENT_BATCH,
        "cost_ms": cost_ms,
    }


def engine_env() -> dict[str, str]:
    """The environment of the engine's ``irefine run`` processes: this one's (server URL, homes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL", "IRE_DASK_ADDRESS", "IRE_REDIS_URL"):
        env.pop(name, None)
    return env


def median(values: list[float]) -> float:
    return float(statistics.median(values))
