"""TPE's quality with pipelined cycles: lock-step vs asking one batch ahead, at equal evaluations.

The built-in ``svc`` problem (an SVC's C, gamma and kernel, 3-fold cross-validated accuracy,
maximised) is tuned by the engine's loop in this process (in-process executor, cache off) with TPE
twice per seed: ``ask_ahead`` off (cycle n+1 asked after cycle n is told) and on (asked while
cycle n evaluates, seeing it as running trials through optuna's constant liar). The last line on
stdout is one JSON object with each seed's best accuracy and the mean difference. From the
repository root::

    .venv/bin/python bench/tpe_quality.py                      # digits, 8 seeds, 60 evaluations
    .venv/bin/python bench/tpe_quality.py --dataset wine --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def best_accuracy(store: object, dataset: str, seed: int, evaluations: int, batch: int, ahead: bool) -> float:
    """The best cross-validated accuracy one TPE job finds within ``evaluations``."""
    from engine.core import JobSpec
    from engine.execution import InProcessExecutor
    from engine.runner import create_job, run_job

    spec = JobSpec.parse(
        {
            "problem": "svc",
            "problem_params": {"dataset": dataset, "cv": 3},
            "strategy": "tpe",
            "strategy_params": {"ask_ahead": ahead},
            "batch_size": batch,
            "seed": seed,
            "max_evaluations": evaluations,
            "cache": "off",
        }
    )
    job = create_job(store, spec, f"svc-{dataset}-{seed}-{'ahead' if ahead else 'lock'}")  # type: ignore[arg-type]
    result = run_job(job, store, InProcessExecutor())  # type: ignore[arg-type]
    assert result.progress.best_score is not None
    return float(result.progress.best_score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer", "wine"])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from engine.store import JobStore

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpe-quality-") as tmp:
        store = JobStore(f"sqlite:///{tmp}/jobs.db")
        try:
            lock_step, ahead = [], []
            for seed in range(1, args.seeds + 1):
                lock_step.append(
                    best_accuracy(store, args.dataset, seed, args.evaluations, args.batch, False)
                )
                ahead.append(best_accuracy(store, args.dataset, seed, args.evaluations, args.batch, True))
                print(
                    f"[tpe_quality] seed {seed}: lock-step {lock_step[-1]:.4f} ahead {ahead[-1]:.4f}",
                    file=sys.stderr,
                )
        finally:
            store.close()
    differences = [a - b for a, b in zip(ahead, lock_step, strict=True)]
    report = {
        "bench": "tpe_quality",
        "problem": f"svc/{args.dataset}/cv3",
        "evaluations": args.evaluations,
        "batch": args.batch,
        "seeds": args.seeds,
        "lock_step_best": lock_step,
        "pipelined_best": ahead,
        "lock_step_mean": statistics.fmean(lock_step),
        "pipelined_mean": statistics.fmean(ahead),
        "mean_difference": statistics.fmean(differences),
        "pipelined_not_worse_share": sum(d >= 0 for d in differences) / len(differences),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
