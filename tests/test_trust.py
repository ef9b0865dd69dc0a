"""Trust boundaries (issue 13): signed checkpoints, allow-listed problems, retries only for what can
heal, and bad input that writes nothing. Real stores (SQLite and PostgreSQL), a real LocalCluster,
a real Prefect server and the CLI as a subprocess."""

from __future__ import annotations

import base64
import json
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine.core import JobSpec, SpecError
from engine.execution import InProcessExecutor
from engine.problems import load_problem
from engine.runner import create_job, resume_job, run_job
from engine.signing import (
    CheckpointRefusedError,
    key_file_key,
    secret_key,
    sign,
    sign_checkpoint,
    verified_checkpoint,
    verify,
)
from engine.store import JobStatus, JobStore

ROOT = Path(__file__).resolve().parents[1]


def irefine(
    *args: str, env: dict[str, str], stdin: str = "", timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "irefine", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class MarkerPickle:
    """Unpickling this creates the file ``path``: what an attacker's checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# -- signing -------------------------------------------------------------------------------------


def test_sign_and_verify_bytes() -> None:
    key = b"k" * 32
    signature = sign(b"state", key)
    assert signature.startswith("hmac-sha256:") and verify(b"state", signature, key)
    assert not verify(b"state!", signature, key)
    assert not verify(b"state", signature, b"other-key-of-32-bytes-long......")
    assert not verify(b"state", None, key)


def test_key_file_is_made_private_once_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = key_file_key(home)
    path = home / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 64
    assert [p.name for p in home.iterdir()] == ["secret.key"]  # no temporary file left
    assert key_file_key(home) == key
    path.chmod(0o644)
    with pytest.raises(SpecError, match="chmod 600"):
        key_file_key(home)


def test_secret_key_setting_wins_over_the_key_file(ire_env: dict[str, str], monkeypatch) -> None:
    monkeypatch.setenv("IRE_SECRET_KEY", "s3cret-s3cret-s3cret")
    assert secret_key() == b"s3cret-s3cret-s3cret"
    assert not (Path(ire_env["IRE_HOME"]) / "secret.key").exists()
    monkeypatch.setenv("IRE_SECRET_KEY", "short")
    with pytest.raises(SpecError, match="IRE_SECRET_KEY"):
        secret_key()


def test_a_checkpoint_is_bound_to_its_job_and_its_content() -> None:
    key = b"k" * 32
    signed = sign_checkpoint("job-a", {"strategy": {"es": "abc"}, "progress": {"cycles": 2}}, key)
    assert verified_checkpoint("job-a", json.loads(json.dumps(signed)), key) == {
        "strategy": {"es": "abc"},
        "progress": {"cycles": 2},
    }
    with pytest.raises(
        CheckpointRefusedError, match=r"'job-b'.*does not match.*irefine checkpoints resign job-b"
    ):
        verified_checkpoint("job-b", signed, key)
    with pytest.raises(CheckpointRefusedError, match="does not match"):
        verified_checkpoint("job-a", {**signed, "progress": {"cycles": 3}}, key)
    with pytest.raises(CheckpointRefusedError, match="is not signed"):
        verified_checkpoint("job-a", {"strategy": {}, "progress": {}}, key)


def _stopped_cmaes_job(url: str, job_id: str) -> JobStore:
    """A CMA-ES job run for two cycles and left as a killed process leaves it (``running``)."""
    store = JobStore(url)
    spec = {
        "problem": "sphere",
        "problem_params": {"dim": 2},
        "strategy": "cmaes",
        "batch_size": 4,
        "seed": 3,
    }
    job = create_job(store, JobSpec.parse({**spec, "max_cycles": 2}), job_id)
    run_job(job, store, InProcessExecutor())
    store.set_status(job_id, JobStatus.RUNNING)
    return store


def _plant(store: JobStore, job_id: str, marker: Path, *, keep_signature: bool) -> None:
    """Replace the CMA-ES pickle of the job's checkpoint by one that creates ``marker``."""
    checkpoint = store.last_checkpoint(job_id)
    assert checkpoint is not None and checkpoint.state["strategy"]["es"]
    state = dict(checkpoint.state)
    state["strategy"] = {
        **state["strategy"],
        "es": base64.b64encode(pickle.dumps(MarkerPickle(marker))).decode(),
    }
    if not keep_signature:
        del state["signature"]
    assert store.replace_checkpoint_state(job_id, checkpoint.cycle, state)


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("keep_signature", [False, True], ids=["unsigned", "altered"])
def test_a_planted_pickle_never_runs_and_resume_refuses_in_one_line(
    backend: str, keep_signature: bool, request, ire_env: dict[str, str], tmp_path: Path
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    marker = tmp_path / "pwned"
    store = _stopped_cmaes_job(url, "planted")
    try:
        _plant(store, "planted", marker, keep_signature=keep_signature)
        with pytest.raises(CheckpointRefusedError):
            resume_job(store, "planted")
    finally:
        store.close()
    out = irefine("resume", "planted", env={**ire_env, "IRE_DATABASE_URL": url})
    assert out.returncode == 1, out
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    expected = "does not match" if keep_signature else "is not signed"
    assert "job 'planted'" in out.stderr and expected in out.stderr
    assert "irefine checkpoints resign planted" in out.stderr
    assert not marker.exists()


@pytest.mark.integration
def test_resign_asks_then_signs_and_the_job_resumes_as_before(
    ire_env: dict[str, str], sqlite_url: str
) -> None:
    store = _stopped_cmaes_job(sqlite_url, "old")
    try:
        checkpoint = store.last_checkpoint("old")
        assert checkpoint is not None
        genuine = {k: v for k, v in checkpoint.state.items() if k != "signature"}
        store.replace_checkpoint_state("old", checkpoint.cycle, genuine)  # as written before signing
        env = {**ire_env, "IRE_DATABASE_URL": sqlite_url}
        declined = irefine("checkpoints", "resign", "old", env=env, stdin="n\n")
        assert declined.returncode == 1 and "nothing re-signed" in declined.stdout, declined
        assert "job old: checkpoint of cycle 2 is not signed" in declined.stdout
        with pytest.raises(CheckpointRefusedError):
            resume_job(store, "old")
        done = irefine("checkpoints", "resign", "--all", "--yes", env=env)
        assert done.returncode == 0 and "re-signed 1 checkpoint(s)" in done.stdout, done
        job = resume_job(store, "old")
        assert job.progress.cycles == 2
        again = irefine("checkpoints", "resign", "--all", env=env)
        assert again.returncode == 0 and "nothing to do" in again.stdout
        bad = irefine("checkpoints", "resign", "no-such-job", "--yes", env=env)
        assert bad.returncode == 2 and "no job 'no-such-job'" in bad.stderr
    finally:
        store.close()


# -- problems from outside -----------------------------------------------------------------------


def test_an_import_path_outside_the_allow_list_is_refused_before_import() -> None:
    assert "this" not in sys.modules
    with pytest.raises(SpecError, match=r"module 'this' is not allowed.*IRE_PROBLEM_MODULES=tests"):
        load_problem("this:s", allowed_modules=("tests",))
    assert "this" not in sys.modules  # importing it would have printed the Zen of Python
    # Built-ins, their own import paths and allow-listed prefixes pass.
    assert load_problem("sphere", {"dim": 2}, allowed_modules=())
    assert load_problem("engine.problems.benchmarks:Sphere", {"dim": 2}, allowed_modules=())
    assert load_problem("tests.problems_for_tests:Flaky", allowed_modules=("tests",))
    with pytest.raises(SpecError, match="not allowed"):
        load_problem("testsuite:Thing", allowed_modules=("tests",))


def test_a_class_that_is_not_a_problem_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "popen-ran"
    with pytest.raises(SpecError, match="'subprocess:Popen' is a class with no callable 'evaluate"):
        load_problem("subprocess:Popen", {"args": f"touch {marker}", "shell": "true"})
    time.sleep(0.2)
    assert not marker.exists()


def test_irefine_run_refuses_popen_and_writes_nothing(ire_env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "popen-ran"
    out = irefine(
        "run",
        "--problem",
        "subprocess:Popen",
        "--problem-param",
        f"args=touch {marker}",
        "--problem-param",
        "shell=true",
        "--max-evaluations",
        "4",
        env=ire_env,
    )
    assert out.returncode == 2, out
    assert "not called" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    time.sleep(0.2)
    assert not marker.exists()
    assert not Path(ire_env["IRE_HOME"]).exists()


# -- bad input writes nothing ----------------------------------------------------------------------


def test_non_finite_bounds_are_refused() -> None:
    from engine.core import Choice, Float, Int

    for make in (
        lambda: Float(float("nan"), 1.0),
        lambda: Float(0.0, float("inf")),
        lambda: Int(float("nan"), 3),  # type: ignore[arg-type]
        lambda: Int(0, float("inf")),  # type: ignore[arg-type]
        lambda: Choice([1.0, float("nan")]),
    ):
        with pytest.raises(SpecError):
            make()
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SpecError, match="target"):
            JobSpec.parse({"problem": "sphere", "target": value})


@pytest.mark.parametrize(
    "args",
    [
        ["--problem", "sphere", "--target", "nan"],
        ["--problem", "sphere", "--tolerance", "inf"],
        ["--problem", "sphere", "--problem-param", "dim=0"],
        ["--problem", "no_such_problem"],
    ],
    ids=["target-nan", "tolerance-inf", "bad-param", "unknown-problem"],
)
def test_a_refused_run_creates_no_file(args: list[str], ire_env: dict[str, str]) -> None:
    out = irefine("run", *args, env=ire_env, timeout=120)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1
    assert not Path(ire_env["IRE_HOME"]).exists()


# -- retry only what can heal ----------------------------------------------------------------------


@pytest.fixture
def fresh_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cluster
    cluster.close()


def _attempts(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


@pytest.mark.integration
@pytest.mark.slow
def test_a_problem_that_cannot_be_built_on_a_worker_is_not_retried(fresh_cluster, tmp_path: Path) -> None:
    from engine.execution import ProblemRef
    from engine.execution.dask import DaskExecutor

    counter = tmp_path / "attempts"
    ref = ProblemRef("tests.problems_for_tests:BrokenOnWorker", {"counter": str(counter)})
    load_problem(ref.name, ref.params)  # builds in this process, which is no worker
    assert _attempts(counter) == 0
    executor = DaskExecutor.start(fresh_cluster.scheduler_address)
    try:
        from engine.core import Candidate

        with pytest.raises(SpecError, match=r"licence server is unreachable.*on a Dask worker; not retried"):
            executor.evaluate(ref, [Candidate({"x": 0.5}), Candidate({"x": 0.25})], shard_size=10)
    finally:
        executor.close()
    assert _attempts(counter) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_the_flow_fails_such_a_job_at_once_with_the_users_error(
    prefect_api: str, ire_env: dict[str, str], fresh_cluster, tmp_path: Path
) -> None:
    from engine.settings import load_settings
    from flows.refine import refine

    counter = tmp_path / "attempts"
    spec = JobSpec.parse(
        {
            "problem": "tests.problems_for_tests:BrokenOnWorker",
            "problem_params": {"counter": str(counter)},
            # Lock-step, so that one cycle is sent out (a strategy that asks ahead sends a second
            # cycle at once, whose shard would be a first attempt of its own).
            "strategy": "tpe",
            "strategy_params": {"ask_ahead": False},
            "batch_size": 4,
            "shard_size": 10,
            "max_cycles": 3,
            "cache": "off",
        }
    )
    started = time.monotonic()
    state = refine(
        spec=spec, job_id="broken", dask_address=fresh_cluster.scheduler_address, return_state=True
    )
    assert state.is_failed()
    assert time.monotonic() - started < 30  # no backoff: 3 Prefect retries would take 1 + 2 + 4 s + jitter
    # Neither Dask (retries=3) nor Prefect (3 retries) tried again (either would make 4 or more),
    # and the pipeline does not evaluate the failed cycle again while it closes.
    assert _attempts(counter) == 1
    store = JobStore.from_settings(load_settings())
    try:
        record = store.get_job("broken")
    finally:
        store.close()
    assert record.status is JobStatus.FAILED
    assert "licence server is unreachable" in (record.error or "")
    assert "Dask lost" not in (record.error or "")


@pytest.mark.integration
def test_retry_transient_retries_infrastructure_errors_only(prefect_api: str) -> None:
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError
    from prefect import flow, task

    from engine.core import TransientError
    from flows.refine import retry_transient

    attempts: dict[str, int] = {}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient, persist_result=False)
    def stage(name: str, error: BaseException) -> None:
        attempts[name] = attempts.get(name, 0) + 1
        raise error

    @flow(persist_result=False)
    def stages() -> None:
        errors: dict[str, BaseException] = {
            "transient": TransientError("the store is unavailable"),
            "killed": KilledWorker("shard-1", SimpleNamespace(address="tcp://127.0.0.1:1"), 3),
            "comm": CommClosedError("in <TCP>: Stream is closed"),
            "connection": ConnectionResetError("reset by peer"),
            "user": ValueError("the user's bug"),
            "spec": SpecError("problem 'x' could not be created"),
        }
        for name, error in errors.items():
            stage.submit(name, error).wait()

    stages(return_state=True)
    assert attempts == {"transient": 3, "killed": 3, "comm": 3, "connection": 3, "user": 1, "spec": 1}


def test_resign_is_documented_in_help(ire_env: dict[str, str]) -> None:
    out = irefine("checkpoints", "resign", "--help", env=ire_env)
    assert out.returncode == 0 and "--yes" in out.stdout and "--all" in out.stdout
    assert "resign" in irefine("checkpoints", "--help", env=ire_env).stdout
    missing = irefine("checkpoints", "resign", env=ire_env)
    assert missing.returncode == 2 and "--all" in missing.stderr
    assert not Path(ire_env["IRE_HOME"]).exists()


@pytest.mark.integration
def test_a_secret_block_signs_the_flows_checkpoints(
    prefect_api: str, ire_env: dict[str, str], monkeypatch
) -> None:
    from prefect.blocks.system import Secret

    from engine.settings import load_settings
    from engine.signing import use_secret_key
    from flows.refine import refine

    key = "block-key-" + "x" * 24
    Secret(value=key).save("irefine-test-signing-key", overwrite=True)
    monkeypatch.setenv("IRE_SECRET_KEY_BLOCK", "irefine-test-signing-key")
    spec = JobSpec.parse({"problem": "sphere", "strategy": "cmaes", "batch_size": 4, "max_cycles": 2})
    try:
        state = refine(spec=spec, job_id="block-signed", executor="local", return_state=True)
    finally:
        use_secret_key(None)
    assert state.is_completed()
    store = JobStore.from_settings(load_settings())
    try:
        checkpoint = store.last_checkpoint("block-signed")
    finally:
        store.close()
    assert checkpoint is not None
    assert verified_checkpoint("block-signed", checkpoint.state, key.encode())["progress"]["cycles"] == 2
    with pytest.raises(CheckpointRefusedError):  # not under the key file's key
        verified_checkpoint("block-signed", checkpoint.state, key_file_key(Path(ire_env["IRE_HOME"])))
