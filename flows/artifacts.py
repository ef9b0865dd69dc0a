"""What a ``refine`` flow run shows in the Prefect UI: three artifacts per job.

- ``irefine-progress-<job>``: a progress artifact, the share of the job's budget used, updated as
  cycles end and set to 100 when the job completes;
- ``irefine-cycles-<job>``: a table of the job's cycles (every run's, not just this one's), sent
  every :data:`TABLE_INTERVAL_S` seconds while the job runs and at its end;
- ``irefine-summary-<job>``: a markdown summary with the convergence plot, at the end.

Keys derive from the job id alone, so a resumed job's artifacts continue the same history: each
flow run adds a version under the same keys, and the UI's artifact page shows the latest.

Nothing here calls the API on the loop's thread (the overhead benchmark counts every millisecond
of a cycle): the observer hands the latest state to a sender thread, which sends at most
:data:`PROGRESS_INTERVAL_S` apart and drops superseded progress (latest wins). ``finish`` waits
for the last sends. The sender talks to the API through its own client rather than
``prefect.artifacts.create_*_artifact``, which take the flow run from the calling thread's run
context: a background thread has none, so it names the flow run itself.

The plot is an SVG (``engine.observe.plot``) embedded as a ``data:image/svg+xml`` URI: both of
Prefect 3.9's UIs render ``data:image/...`` images in markdown artifacts (the React UI's sanitiser
explicitly lets ``data:image/`` through for ``img src``; the Vue UI does not sanitise), and the
SVG takes milliseconds where matplotlib takes a second at the end of every run.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from engine.core import CycleRecord, JobSpec, Progress
from engine.observe.plot import convergence_series, convergence_svg
from engine.runner import Job
from flows.observers import ObserverContext

__all__ = [
    "PROGRESS_INTERVAL_S",
    "TABLE_INTERVAL_S",
    "ArtifactKeys",
    "ArtifactObserver",
    "artifact_keys",
    "artifact_observer",
    "budget_share",
    "cycle_table",
]

#: Least time between two progress updates: a job of 100 ms cycles would otherwise send ten a
#: second. Each costs the sender 2-4 ms of CPU (the request and the event the client emits with
#: it), taken from the loop's process: once a second keeps that under 0.5%.
PROGRESS_INTERVAL_S = 1.0
#: Least time between two cycle tables while a job runs. A table artifact holds the whole table, so
#: sending it every cycle would cost O(cycles^2) over a long job; every 30 s keeps a long job's
#: table current within half a minute for a few kilobytes a send, and short jobs send it once.
TABLE_INTERVAL_S = 30.0
#: How long ``finish`` waits for the last artifacts before giving up on them (the job is done).
FLUSH_TIMEOUT_S = 30.0

TABLE_COLUMNS = ("cycle", "best", "batch best", "evaluations", "failures", "cache hits", "duration s")


@dataclass(frozen=True, slots=True)
class ArtifactKeys:
    """The artifact keys of one job."""

    progress: str
    cycles: str
    summary: str


def artifact_keys(job_id: str) -> ArtifactKeys:
    """Stable keys for ``job_id``. Prefect allows only lowercase letters, digits and dashes, so
    other characters become dashes, and an id that had to change gets a short hash of itself so
    that ``Run_1`` and ``run-1`` keep apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")
    if slug != job_id:
        digest = hashlib.blake2b(job_id.encode(), digest_size=4).hexdigest()
        slug = f"{slug}-{digest}" if slug else digest
    return ArtifactKeys(f"irefine-progress-{slug}", f"irefine-cycles-{slug}", f"irefine-summary-{slug}")


def budget_share(spec: JobSpec, progress: Progress) -> float:
    """Percent of the job's budget used: evaluations, cycles or seconds against their limits,
    whichever is furthest along (0 when the spec sets none of them)."""
    shares = [0.0]
    if spec.max_evaluations:
        shares.append(progress.evaluations / spec.max_evaluations)
    if spec.max_cycles:
        shares.append(progress.cycles / spec.max_cycles)
    if spec.max_seconds:
        shares.append(progress.elapsed_seconds / spec.max_seconds)
    return round(min(100.0, 100.0 * max(shares)), 2)


def cycle_table(cycles: Sequence[CycleRecord]) -> list[dict[str, Any]]:
    """One row per cycle, with the columns of :data:`TABLE_COLUMNS`."""
    return [
        dict(
            zip(
                TABLE_COLUMNS,
                (c.cycle, _finite(c.best_score), _finite(c.batch_best_score), c.evaluations, c.failed,
                 c.cached, round(c.duration, 3)),
                strict=True,
            )
        )
        for c in cycles
    ]  # fmt: skip


def _finite(score: float | None) -> float | None:
    # The UI parses the table as JSON, which has no NaN or infinity.
    return score if score is not None and math.isfinite(score) else None


def artifact_observer(job: Job, context: ObserverContext) -> ArtifactObserver | None:
    """The observer factory of ``flows.observer_set.DEFAULT_OBSERVERS``; sits out a run that
    has no Prefect flow run (artifacts hang off one)."""
    if context.flow_run_id is None:
        return None
    return ArtifactObserver(job, context)


class ArtifactObserver:
    """Keeps one job's artifacts current; see the module docstring. Its calls are made on the
    loop's thread and only hand state to the sender thread."""

    def __init__(
        self,
        job: Job,
        context: ObserverContext,
        *,
        progress_interval: float | None = None,
        table_interval: float | None = None,
    ) -> None:
        self._sender = _Sender(
            job.job_id,
            job.progress.cycles + 1,
            UUID(str(context.flow_run_id)),
            context,
            progress_interval=PROGRESS_INTERVAL_S if progress_interval is None else progress_interval,
            table_interval=TABLE_INTERVAL_S if table_interval is None else table_interval,
        )
        self._sender.post(budget_share(job.spec, job.progress), _progress_note(job), None)

    def __call__(self, job: Job, record: CycleRecord) -> tuple[()]:
        self._sender.post(budget_share(job.spec, job.progress), _progress_note(job), record)
        return ()

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if result is not None:
            status, reason = str(result.get("status", "completed")), result.get("stop_reason")
        elif isinstance(error, KeyboardInterrupt):
            status, reason = "interrupted", "interrupted; resume it with irefine resume"
        else:
            status, reason = "failed", f"{type(error).__name__}: {error}"
        share = 100.0 if status == "completed" else budget_share(job.spec, job.progress)
        self._sender.close(_Final(job, status, str(reason or ""), share))


def _progress_note(job: Job) -> str:
    p, spec = job.progress, job.spec
    budget = f"/{spec.max_evaluations}" if spec.max_evaluations else ""
    best = "-" if p.best_score is None else f"{p.best_score:.6g}"
    return f"job {job.job_id}: cycle {p.cycles}, {p.evaluations}{budget} evaluations, best {best}"


@dataclass(frozen=True)
class _Final:
    job: Job
    status: str
    reason: str
    share: float


class _Sender:
    """The thread that talks to the Prefect API for one flow run's artifacts.

    ``post`` and ``close`` are called from the loop's thread and only take a lock briefly. Every
    failure to send is logged (the first as a warning) and counted; none reaches the job.
    """

    def __init__(
        self,
        job_id: str,
        first_cycle: int,
        flow_run_id: UUID,
        context: ObserverContext,
        *,
        progress_interval: float,
        table_interval: float,
    ) -> None:
        from prefect.context import SettingsContext

        self.failures = 0
        self._job_id = job_id
        self._flow_run_id = flow_run_id
        self._keys = artifact_keys(job_id)
        self._store = context.store
        self._logger = context.logger
        self._progress_interval = progress_interval
        self._table_interval = table_interval
        # The caller's Prefect settings (e.g. a temporary API URL) live in a context variable,
        # which a new thread does not inherit: hand the thread a copy.
        settings = SettingsContext.get()
        self._settings = settings.model_copy() if settings is not None else None
        self._cond = threading.Condition()
        self._progress: tuple[float, str] | None = None
        self._first_cycle = first_cycle
        self._earlier: list[CycleRecord] | None = None
        self._records: list[CycleRecord] = []
        self._final: _Final | None = None
        self._ids: dict[str, UUID] = {}
        self._table_sent_at = time.monotonic()
        self._rows_sent = 0
        self._thread = threading.Thread(target=self._run, name=f"irefine-artifacts-{job_id}", daemon=True)
        self._thread.start()

    def post(self, share: float, note: str, record: CycleRecord | None) -> None:
        with self._cond:
            self._progress = (share, note)
            if record is not None:
                self._records.append(record)
            self._cond.notify()

    def close(self, final: _Final) -> None:
        with self._cond:
            self._final = final
            self._cond.notify()
        self._thread.join(FLUSH_TIMEOUT_S)
        if self._thread.is_alive():
            self._logger.warning(
                "job %s: the Prefect API took over %.0f s to take the final artifacts; going on without",
                self._job_id,
                FLUSH_TIMEOUT_S,
            )
        elif self.failures:
            self._logger.warning("job %s: %d artifact updates failed", self._job_id, self.failures)

    # -- the sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            with self._settings or nullcontext(), get_client(sync_client=True) as client:
                while True:
                    with self._cond:
                        self._cond.wait_for(lambda: self._progress is not None or self._final is not None)
                        progress, final = self._progress, self._final
                        self._progress = None
                    if final is not None:
                        self._send_final(client, final)
                        return
                    assert progress is not None
                    self._attempt("progress", self._send_progress, client, *progress)
                    if time.monotonic() - self._table_sent_at >= self._table_interval:
                        self._attempt("cycle table", self._send_table, client, self._history())
                    with self._cond:  # at most one progress update per interval; a close cuts it short
                        self._cond.wait_for(lambda: self._final is not None, timeout=self._progress_interval)
        except Exception as exc:
            self._failed("keep sending artifacts (the sender stopped)", exc)

    def _send_final(self, client: Any, final: _Final) -> None:
        """The last progress, the full table and the summary, sent at once: ``finish`` waits for
        them, and on a busy server one round trip costs ~10-300 ms (the client is thread-safe)."""
        from concurrent.futures import ThreadPoolExecutor

        note = f"job {self._job_id} {final.status}: {final.reason}"
        history = self._history()
        sends = [
            ("progress", self._send_progress, (client, final.share, note)),
            ("cycle table", self._send_table, (client, history)),
            ("summary", self._send_summary, (client, final, history)),
        ]
        with ThreadPoolExecutor(len(sends), thread_name_prefix="irefine-artifacts") as pool:
            for what, send, args in sends:
                # Each in this thread's context: the client emits an event per artifact through
                # the Prefect settings found there (without them it would start a local server).
                pool.submit(contextvars.copy_context().run, self._attempt, what, send, *args)

    def _attempt(self, what: str, send: Any, *args: Any) -> None:
        try:
            send(*args)
        except Exception as exc:
            self._failed(f"send the {what} artifact", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        with self._cond:  # the final sends run on three threads
            self.failures += 1
            first = self.failures == 1
        log = self._logger.warning if first else self._logger.debug
        log("job %s: could not %s: %s: %s", self._job_id, what, type(exc).__name__, exc)

    def _history(self) -> list[CycleRecord]:
        """Every cycle of the job: earlier runs' from the store (read once: they do not change),
        then this run's as the loop reported them, which the store may not have yet (the runner
        commits a cycle while the next one evaluates)."""
        if self._earlier is None:
            try:
                stored = self._store.cycles(self._job_id, fresh=True) if self._first_cycle > 1 else []
                self._earlier = [c for c in stored if c.cycle < self._first_cycle]
            except Exception as exc:  # the table shows this run's cycles; the next send tries again
                self._failed("read the earlier cycles", exc)
        with self._cond:
            return (self._earlier or []) + self._records

    def _upsert(self, client: Any, kind: str, key: str, data: Any, description: str) -> None:
        """Create this run's version of the artifact ``key`` on first use, then update it."""
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        artifact_id = self._ids.get(kind)
        if artifact_id is None:
            created = client.create_artifact(
                ArtifactCreate(
                    key=key, type=kind, data=data, description=description, flow_run_id=self._flow_run_id
                )
            )
            self._ids[kind] = created.id
        else:
            client.update_artifact(artifact_id, ArtifactUpdate(data=data, description=description))

    def _send_progress(self, client: Any, share: float, note: str) -> None:
        self._upsert(client, "progress", self._keys.progress, share, note)

    def _send_table(self, client: Any, history: list[CycleRecord]) -> None:
        self._table_sent_at = time.monotonic()
        if len(history) == self._rows_sent and "table" in self._ids:
            return
        rows = cycle_table(history)
        note = f"job {self._job_id}: {len(rows)} cycles"
        self._upsert(client, "table", self._keys.cycles, json.dumps(rows), note)
        self._rows_sent = len(history)

    def _send_summary(self, client: Any, final: _Final, history: list[CycleRecord]) -> None:
        markdown = summary_markdown(final.job, final.status, final.reason, history)
        self._upsert(client, "markdown", self._keys.summary, markdown, f"job {self._job_id}: {final.status}")


def summary_markdown(job: Job, status: str, reason: str, cycles: Sequence[CycleRecord]) -> str:
    """The summary artifact: the outcome, the figures that matter, and the convergence plot."""
    spec, p = job.spec, job.progress
    series = convergence_series(cycles, job_id=job.job_id, problem=spec.problem, strategy=spec.strategy)
    svg = base64.b64encode(convergence_svg(series).encode()).decode()
    best = "-" if p.best_score is None else f"{p.best_score:.6g} (cycle {p.best_cycle})"
    candidate = "-" if p.best_candidate is None else json.dumps(p.best_candidate).replace("|", "\\|")
    return (
        f"# Job `{job.job_id}`: {status}\n\n"
        f"{spec.problem} with {spec.strategy}: {reason}\n\n"
        "| figure | value |\n|---|---|\n"
        f"| cycles | {p.cycles} |\n"
        f"| evaluations | {p.evaluations} ({p.failed} failed, {p.cached} from the cache) |\n"
        f"| best score | {best} |\n"
        f"| best candidate | `{candidate}` |\n\n"
        f"![convergence plot of {job.job_id}](data:image/svg+xml;base64,{svg})\n"
    )
