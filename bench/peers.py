"""The engine against the tools users would otherwise pick, on one job run side by side.

The workload (issue 17): minimise a 6-D sphere, every evaluation 20 ms of busy CPU, 400
evaluations, TPE, parallelism 2, on the same 2 cores. Each contender is timed as a whole command,
from launch to exit (interpreter start and imports included, as a user would see it):

- ``floor``: a plain process pool of 2 evaluating 400 random points, no search at all;
- ``optuna``: Optuna alone, two processes sharing a journal-file study (TPE, 200 trials each);
- ``engine``: ``irefine run ... --strategy tpe`` against a running Prefect server (the local server
  of ``irefine server start``, whose launcher runs it warm; ``--postgres``: a Prefect server on
  PostgreSQL, the run starting cold), with its own 2-worker LocalCluster and the inference cache
  off (cycles pipelined: TPE asks cycle n+1 while cycle n evaluates);
- ``engine_lock_step`` (with ``--lock-step``): the same with ``ask_ahead=false``, each cycle
  proposed only after the one before is told, to show what the pipelining buys;
- ``ray``: Ray Tune with ``OptunaSearch``, only if ``ray[tune]`` is importable (optional column).

Contenders run in turns (floor, optuna, engine, ...) ``--reps`` times; the figures are medians.
The last line on stdout is one JSON object; progress goes to stderr. From the repository root::

    .venv/bin/python bench/peers.py             # 3 repetitions, ~2 minutes
    .venv/bin/python bench/peers.py --reps 1 --lock-step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIM = 6
COST_MS = 20.0
EVALUATIONS = 400
PARALLELISM = 2
BATCH = 8  # the engine's batch: 4 candidates per worker a cycle

# One evaluation, the same busy CPU for every contender (engine.problems.benchmarks.busy_wait).
_OBJECTIVE = f"""
from engine.problems.benchmarks import busy_wait
def sphere(x):
    busy_wait({COST_MS})
    return float(sum(v * v for v in x))
"""

FLOOR = (
    _OBJECTIVE
    + f"""
import random
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    rng = random.Random(SEED)
    points = [[rng.uniform(-5, 5) for _ in range({DIM})] for _ in range({EVALUATIONS})]
    with ProcessPoolExecutor({PARALLELISM}) as pool:
        best = min(pool.map(sphere, points, chunksize=4))
    print(best)
"""
)

OPTUNA_WORKER = (
    _OBJECTIVE
    + f"""
import sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
path, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = JournalStorage(JournalFileBackend(path))
study = optuna.load_study(study_name=name, storage=storage,
                          sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
def objective(trial):
    return sphere([trial.suggest_float(f"x{{i}}", -5.0, 5.0) for i in range({DIM})])
study.optimize(objective, n_trials={EVALUATIONS // PARALLELISM})
"""
)

OPTUNA_MAIN = f"""
import subprocess, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
path, name, seed = sys.argv[1], "peers", int(sys.argv[2])
storage = JournalStorage(JournalFileBackend(path))
optuna.create_study(study_name=name, storage=storage, direction="minimize")
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[3], path, name, str(seed + i)])
         for i in range({PARALLELISM})]
codes = [p.wait() for p in procs]
if any(codes):
    sys.exit(1)
study = optuna.load_study(study_name=name, storage=storage)
print(len(study.trials), study.best_value)
"""

RAY = (
    _OBJECTIVE
    + f"""
import sys
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch
ray.init(num_cpus={PARALLELISM}, include_dashboard=False, log_to_driver=False)
def trainable(config):
    return {{"loss": sphere([config[f"x{{i}}"] for i in range({DIM})])}}
space = {{f"x{{i}}": tune.uniform(-5.0, 5.0) for i in range({DIM})}}
tuner = tune.Tuner(
    trainable,
    param_space=space,
    tune_config=tune.TuneConfig(search_alg=OptunaSearch(seed=int(sys.argv[1])), metric="loss",
                                mode="min", num_samples={EVALUATIONS}, max_concurrent_trials={PARALLELISM},
                                reuse_actors=True),
)
print(tuner.fit().get_best_result().metrics["loss"])
"""
)


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(cmd: list[str], env: dict[str, str], label: str) -> tuple[float, str]:
    """Wall seconds of ``cmd`` from launch to exit, and its last line of output."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{label} exited {done.returncode}:\n{tail}")
    lines = done.stdout.strip().splitlines()
    return wall, lines[-1] if lines else ""


def run_floor(env: dict[str, str], seed: int) -> tuple[float, str]:
    return timed([sys.executable, "-c", FLOOR.replace("SEED", str(seed))], env, "floor")


def run_optuna(env: dict[str, str], seed: int, workdir: Path) -> tuple[float, str]:
    journal = workdir / f"optuna-{seed}.log"
    return timed([sys.executable, "-c", OPTUNA_MAIN, str(journal), str(seed), OPTUNA_WORKER], env, "optuna")


def run_engine(env: dict[str, str], seed: int, lock_step: bool = False) -> tuple[float, str]:
    cmd = [
        sys.executable, "-m", "irefine", "run", "--problem", "sphere",
        "--problem-param", f"dim={DIM}", "--problem-param", f"cost_ms={COST_MS:g}",
        "--strategy", "tpe", "--batch-size", str(BATCH), "--max-evaluations", str(EVALUATIONS),
        "--seed", str(seed), "--cache", "off", "-q",
    ]  # fmt: skip
    if lock_step:
        cmd += ["--strategy-param", "ask_ahead=false"]
    wall, _ = timed(cmd, env, "engine")
    status = subprocess.run(
        [sys.executable, "-m", "irefine", "list", "--json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    best = ""
    with contextlib.suppress(ValueError, KeyError, IndexError):
        best = str(json.loads(status.stdout)[0]["best_score"])
    return wall, best


def run_ray(env: dict[str, str], seed: int) -> tuple[float, str]:
    return timed([sys.executable, "-c", RAY, str(seed)], env, "ray")


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


@contextlib.contextmanager
def prefect_server(workdir: Path, postgres: bool) -> Iterator[dict[str, str]]:
    """The environment of every contender: a running Prefect server for the engine (the local
    server of ``irefine server start``, with its launcher; or, with ``postgres``, a Prefect server
    on PostgreSQL through PREFECT_API_URL, each run then starting cold), fresh IRE_HOME and
    PREFECT_HOME, and 2 Dask workers."""
    from tests.prefect_server import prefect_api_on_postgres

    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "IRE_HOME": str(workdir / "ire-home"),
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "IRE_DASK_WORKERS": str(PARALLELISM),
        "PYTHONPATH": str(ROOT),
    }
    for name in ("IRE_DATABASE_URL", "IRE_DATABASE_REPLICA_URL", "IRE_DASK_ADDRESS", "IRE_REDIS_URL"):
        env.pop(name, None)
    if postgres:
        with prefect_api_on_postgres() as server:
            env["PREFECT_API_URL"] = server.url
            yield env
        return
    env.pop("PREFECT_API_URL", None)
    irefine = [sys.executable, "-m", "irefine", "server"]
    started = subprocess.run(
        [*irefine, "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"irefine server start failed: {started.stdout}{started.stderr}")
        env["PEERS_SERVER"] = started.stdout.splitlines()[0]
        yield env
    finally:
        subprocess.run([*irefine, "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each contender (median)")
    parser.add_argument("--seed", type=int, default=1000, help="first seed (repetition i uses seed + i)")
    parser.add_argument("--lock-step", action="store_true", help="also the engine without pipelined cycles")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the engine against a Prefect server on PostgreSQL (cold runs) instead of the local server",
    )
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with_ray = ray_available()
    walls: dict[str, list[float]] = {"floor": [], "optuna": [], "engine": []}
    bests: dict[str, list[str]] = {"floor": [], "optuna": [], "engine": []}
    if args.lock_step:
        walls["engine_lock_step"], bests["engine_lock_step"] = [], []
    if with_ray:
        walls["ray"], bests["ray"] = [], []
    with (
        tempfile.TemporaryDirectory(prefix="ire-peers-") as tmp,
        prefect_server(Path(tmp), args.postgres) as env,
    ):
        log(f"{env.get('PEERS_SERVER') or env['PREFECT_API_URL']}; warming up the engine once (not counted)")
        run_engine(env, args.seed - 1)
        for rep in range(args.reps):
            seed = args.seed + rep
            for name in walls:
                if name == "floor":
                    wall, best = run_floor(env, seed)
                elif name == "optuna":
                    wall, best = run_optuna(env, seed, Path(tmp))
                elif name == "engine":
                    wall, best = run_engine(env, seed)
                elif name == "engine_lock_step":
                    wall, best = run_engine(env, seed, lock_step=True)
                else:
                    wall, best = run_ray(env, seed)
                walls[name].append(round(wall, 3))
                bests[name].append(best)
                log(f"rep {rep + 1}/{args.reps} {name}: {wall:.2f} s ({best})")
    median = {name: round(statistics.median(values), 3) for name, values in walls.items()}
    report: dict[str, Any] = {
        "bench": "peers",
        "engine_s": median["engine"],
        "optuna_s": median["optuna"],
        "floor_s": median["floor"],
        "engine_to_optuna": round(median["engine"] / median["optuna"], 3),
        "engine_to_floor": round(median["engine"] / median["floor"], 3),
        "optuna_to_floor": round(median["optuna"] / median["floor"], 3),
        "engine_lock_step_s": median.get("engine_lock_step"),
        "pipelined_to_lock_step": (
            round(median["engine"] / median["engine_lock_step"], 3) if "engine_lock_step" in median else None
        ),
        "ray_s": median.get("ray"),
        "runs": walls,
        "best": bests,
        "workload": {
            "problem": f"sphere-{DIM}",
            "cost_ms": COST_MS,
            "evaluations": EVALUATIONS,
            "parallelism": PARALLELISM,
            "engine_batch": BATCH,
            "strategy": "tpe",
        },
        "engine_server": "postgres (cold runs)" if args.postgres else "local server with its launcher",
        "reps": args.reps,
        "machine_cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),  # the machine may be shared
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
