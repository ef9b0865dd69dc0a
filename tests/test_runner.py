"""The refinement loop without Prefect: stop rules, failures, determinism, resume, CMA-ES quality."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core import JobFailedError, JobSpec
from engine.execution import InProcessExecutor
from engine.problems import load_problem, problem_space
from engine.runner import create_job, resume_job, run_job
from engine.store import JobStatus, JobStore


@pytest.fixture
def store(sqlite_url: str):
    s = JobStore(sqlite_url)
    yield s
    s.close()


def run(store: JobStore, job_id: str | None = None, **spec) -> tuple:
    job = create_job(store, JobSpec.parse(spec), job_id)
    return job, run_job(job, store, InProcessExecutor())


def test_job_runs_to_max_evaluations_and_records_everything(store: JobStore) -> None:
    job, result = run(
        store,
        problem="sphere",
        problem_params={"dim": 3},
        strategy="random",
        batch_size=7,
        max_evaluations=30,
    )
    assert result.status is JobStatus.COMPLETED and "max evaluations" in result.stop_reason
    rec = store.get_job(job.job_id)
    assert rec.status is JobStatus.COMPLETED and rec.evaluations == 30 and rec.cycles == 5  # 7+7+7+7+2
    assert len(store.evaluations(job.job_id)) == 30
    assert rec.best_score == min(e.score for e in store.evaluations(job.job_id))
    assert store.last_checkpoint(job.job_id).cycle == 5


def test_target_and_patience(store: JobStore) -> None:
    _, result = run(
        store,
        problem="sphere",
        problem_params={"dim": 2},
        strategy="cmaes",
        batch_size=8,
        max_evaluations=5000,
        target=1e-3,
    )
    assert "target" in result.stop_reason and result.progress.best_score <= 1e-3
    _, result = run(
        store,
        problem="sphere",
        problem_params={"dim": 2},
        strategy="random",
        batch_size=4,
        max_evaluations=100000,
        patience=3,
        tolerance=10.0,
    )
    assert "no improvement" in result.stop_reason and result.progress.cycles == 4


def test_failed_and_nan_evaluations_are_recorded_and_the_job_goes_on(store: JobStore) -> None:
    job, result = run(
        store,
        problem="tests.problems_for_tests:Flaky",
        problem_params={"fail_every": 4},
        strategy="random",
        batch_size=40,
        max_evaluations=200,
        max_failure_share=0.8,
    )
    assert result.status is JobStatus.COMPLETED
    evs = store.evaluations(job.job_id)
    failed = [e for e in evs if e.status == "failed"]
    assert 60 < len(failed) < 140  # half of them: one bucket raises, one returns NaN
    assert any("ValueError: boom" in e.error for e in failed)
    assert any("non-finite" in e.error for e in failed)
    assert all(e.score is not None for e in evs if e.status == "ok")
    assert result.progress.failed == len(failed)
    assert result.progress.best_score is not None


def test_job_fails_when_a_cycle_fails_too_much(store: JobStore) -> None:
    with pytest.raises(JobFailedError, match="max_failure_share"):
        run(
            store,
            job_id="flaky",
            problem="tests.problems_for_tests:Flaky",
            problem_params={"fail_every": 1},
            strategy="random",
            batch_size=10,
            max_evaluations=100,
            max_failure_share=0.2,
        )
    rec = store.get_job("flaky")
    assert rec.status is JobStatus.FAILED and "max_failure_share" in rec.error
    assert rec.cycles == 1  # the failing cycle is recorded before the job stops


@pytest.mark.parametrize("strategy", ["random", "cmaes", "tpe"])
def test_resume_from_checkpoint_equals_uninterrupted(store: JobStore, strategy: str) -> None:
    spec = dict(
        problem="rastrigin",
        problem_params={"dim": 3},
        strategy=strategy,
        batch_size=6,
        seed=7,
        max_evaluations=120,
    )
    _, full = run(store, job_id=f"full-{strategy}", **spec)
    # The same job stopped after 8 cycles, then resumed from its checkpoint in a new runner.
    cut = create_job(store, JobSpec.parse({**spec, "max_cycles": 8}), f"cut-{strategy}")
    run_job(cut, store, InProcessExecutor())
    store.set_status(f"cut-{strategy}", JobStatus.RUNNING)  # as a killed process leaves it
    resumed = resume_job(store, f"cut-{strategy}")
    assert resumed.progress.cycles == 8
    resumed.spec = JobSpec.parse(spec)  # lift the cycle limit, as if the process had died there
    result = run_job(resumed, store, InProcessExecutor())
    assert result.progress.best_score == full.progress.best_score
    assert result.progress.best_candidate == full.progress.best_candidate
    assert result.progress.evaluations == full.progress.evaluations == 120
    a = [(e.fingerprint, e.score) for e in store.evaluations(f"full-{strategy}")]
    b = [(e.fingerprint, e.score) for e in store.evaluations(f"cut-{strategy}")]
    assert a == b


@pytest.mark.slow
def test_cmaes_on_rosenbrock10_reaches_1e6_and_matches_pycma(store: JobStore) -> None:
    import cma

    popsize, seed = 20, 3
    _, result = run(
        store,
        problem="rosenbrock",
        problem_params={"dim": 10},
        strategy="cmaes",
        batch_size=popsize,
        seed=seed,
        max_evaluations=20000,
        target=1e-6,
    )
    assert result.progress.best_score < 1e-6, result.progress
    assert result.progress.evaluations <= 20000

    problem = load_problem("rosenbrock", {"dim": 10})
    space = problem_space(problem)
    es = cma.CMAEvolutionStrategy(
        [0.5] * 10, 0.3, {"seed": seed, "popsize": popsize, "bounds": [0, 1], "verbose": -9}
    )
    best, evals = np.inf, 0
    while evals < result.progress.evaluations:
        X = es.ask()
        f = [problem.evaluate(c) for c in space.decode(np.array(X))]
        es.tell(X, f)
        evals += len(f)
        best = min(best, *f)
    assert evals == result.progress.evaluations
    assert best == result.progress.best_score
