"""Job store on PostgreSQL: commit_cycle and per-job reads with hash-partitioned vs plain tables.

Two fresh databases on one private PostgreSQL server, one with the growing tables plain
(``partitions=0``) and one hash-partitioned (``--partitions``, default 8). Both are filled with
the same jobs and cycles, then timed in alternating rounds: committing cycles of random jobs, and
reading a job's cycles and evaluations. The last line on stdout is one JSON object; the figures
are medians per operation and the partitioned/plain ratios. Run from the repository root::

    .venv/bin/python bench/store.py           # ~1 minute
    .venv/bin/python bench/store.py --quick   # ~15 seconds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cycle_of(progress: Any, rng: random.Random, batch: int) -> tuple[Any, Any, list[Any], list[Any]]:
    """A cycle of ``batch`` evaluated candidates after ``progress``."""
    from engine.core import Candidate, Evaluation, account_cycle

    candidates = [Candidate({"x": rng.uniform(-5, 5), "y": rng.uniform(-5, 5)}) for _ in range(batch)]
    evaluations = [Evaluation(c["x"] ** 2 + c["y"] ** 2, duration=0.05) for c in candidates]
    new, record = account_cycle(
        progress, candidates, evaluations, maximize=False, tolerance=0.0, duration=0.5
    )
    return new, record, candidates, evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--partitions", type=int, default=8, help="hash partitions (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    jobs, fill_cycles, rounds, per_round, batch = (40, 10, 3, 40, 64) if args.quick else (100, 30, 5, 100, 64)

    from engine.core import JobSpec, Progress
    from engine.store import JobStore
    from tests.services import PostgresServer

    spec = JobSpec.parse({"problem": "sphere"})
    started = time.monotonic()
    with PostgresServer() as postgres:
        stores = {
            "plain": JobStore(postgres.new_database(), partitions=0),
            "partitioned": JobStore(postgres.new_database(), partitions=args.partitions),
        }
        progress: dict[str, dict[str, Any]] = {name: {} for name in stores}
        try:
            log(f"filling {jobs} jobs x {fill_cycles} cycles of {batch} in each database")
            for name, store in stores.items():
                rng = random.Random(args.seed)
                for j in range(jobs):
                    job_id = f"job-{j}"
                    store.create_job(job_id, spec)
                    p = Progress()
                    for _ in range(fill_cycles):
                        p, record, cands, evs = cycle_of(p, rng, batch)
                        store.commit_cycle(job_id, record, p, cands, evs, {"n": p.cycles})
                    progress[name][job_id] = p
            commit_s: dict[str, list[float]] = {name: [] for name in stores}
            read_s: dict[str, list[float]] = {name: [] for name in stores}
            for r in range(rounds):
                order = list(stores) if r % 2 == 0 else list(stores)[::-1]  # alternate who goes first
                for name in order:
                    store, rng = stores[name], random.Random(args.seed * 1000 + r)
                    for _ in range(per_round):
                        job_id = f"job-{rng.randrange(jobs)}"
                        p, record, cands, evs = cycle_of(progress[name][job_id], rng, batch)
                        t0 = time.perf_counter()
                        store.commit_cycle(job_id, record, p, cands, evs, {"n": p.cycles})
                        commit_s[name].append(time.perf_counter() - t0)
                        progress[name][job_id] = p
                        t0 = time.perf_counter()
                        store.cycles(job_id)
                        store.evaluations(job_id)
                        read_s[name].append(time.perf_counter() - t0)
                log(f"round {r + 1}/{rounds} done")
        finally:
            for store in stores.values():
                store.close()
    commit_ms = {name: statistics.median(v) * 1000 for name, v in commit_s.items()}
    read_ms = {name: statistics.median(v) * 1000 for name, v in read_s.items()}
    report = {
        "bench": "store",
        "partitions": args.partitions,
        "jobs": jobs,
        "cycles_per_job_at_start": fill_cycles,
        "batch": batch,
        "commits_timed": len(commit_s["plain"]),
        "commit_ms_plain": round(commit_ms["plain"], 3),
        "commit_ms_partitioned": round(commit_ms["partitioned"], 3),
        "commit_ratio_partitioned_to_plain": round(commit_ms["partitioned"] / commit_ms["plain"], 3),
        "read_ms_plain": round(read_ms["plain"], 3),
        "read_ms_partitioned": round(read_ms["partitioned"], 3),
        "read_ratio_partitioned_to_plain": round(read_ms["partitioned"] / read_ms["plain"], 3),
        "total_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
