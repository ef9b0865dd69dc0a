"""``irefine top``: a live terminal view of the running jobs, read from the job store.

It needs neither Prefect nor the flow processes: everything it shows is in the store, which any
number of readers can query while jobs write (SQLite in WAL mode, or PostgreSQL). Each frame lists
the jobs whose status is ``running`` with their cycle, best score, evaluations per second over
their last few cycles, evaluations, anomalies found so far and how long ago the
job last heartbeat, so that a job whose process died without saying so stands out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["JobLine", "job_lines", "render_frame", "run_top", "throughput"]

#: Cycles the evaluations-per-second figure looks back over: recent enough to show a slowdown
#: within a few cycles, long enough not to jump with every cycle.
RECENT_CYCLES = 5
#: Jobs read from the store a frame (newest first); running jobs are among the newest.
JOBS_SCANNED = 500


@dataclass(frozen=True, slots=True)
class JobLine:
    """One running job as ``top`` shows it."""

    job_id: str
    status: str
    cycle: int
    best_score: float | None
    evals_per_second: float | None
    evaluations: int
    anomalies: int
    seconds_since_heartbeat: float | None


def throughput(cycles: Sequence[Any], recent: int = RECENT_CYCLES) -> float | None:
    """Evaluations per second over the last ``recent`` cycles, wall clock between their ends
    (so commit and proposal time count); from the cycle's own duration when there is one cycle."""
    if not cycles:
        return None
    window = list(cycles[-(recent + 1) :])
    if len(window) >= 2:
        span = (window[-1].finished_at - window[0].finished_at).total_seconds()
        if span > 0:
            return sum(c.evaluations for c in window[1:]) / span
    last = window[-1]
    return last.evaluations / last.duration if last.duration > 0 else None


def job_lines(store: Any, now: datetime | None = None) -> list[JobLine]:
    """The running jobs in ``store``, oldest first (a job keeps its place from frame to frame)."""
    now = now or datetime.now(UTC)
    lines = []
    for job in reversed(store.list_jobs(JOBS_SCANNED)):
        if job.status.value != "running":
            continue
        cycles = store.cycles(job.job_id)
        seen = job.heartbeat_at or job.updated_at
        lines.append(
            JobLine(
                job_id=job.job_id,
                status=job.status.value,
                cycle=job.cycles,
                best_score=job.best_score,
                evals_per_second=throughput(cycles),
                evaluations=job.evaluations,
                anomalies=len(store.anomalies(job.job_id)),
                seconds_since_heartbeat=(now - seen).total_seconds() if seen else None,
            )
        )
    return lines


def render_frame(lines: Sequence[JobLine], now: datetime | None = None) -> Any:
    """A rich table of ``lines`` (a renderable: print it, or hand it to ``rich.live.Live``)."""
    from rich import box
    from rich.table import Table

    now = now or datetime.now(UTC)
    jobs = "1 running job" if len(lines) == 1 else f"{len(lines)} running jobs"
    table = Table(
        title=f"irefine top: {jobs} at {now:%H:%M:%S} UTC",
        box=box.SIMPLE,
        caption=None if lines else "no running jobs: start one with `irefine run`",
    )
    for name, justify in (
        ("job", "left"),
        ("status", "left"),
        ("cycle", "right"),
        ("best", "right"),
        ("evals/s", "right"),
        ("evals", "right"),
        ("anomalies", "right"),
        ("heartbeat", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    for line in lines:
        seen = line.seconds_since_heartbeat
        table.add_row(
            line.job_id,
            line.status,
            str(line.cycle),
            "-" if line.best_score is None else f"{line.best_score:.6g}",
            "-" if line.evals_per_second is None else f"{line.evals_per_second:,.1f}",
            f"{line.evaluations:,}",
            str(line.anomalies),
            "-" if seen is None else f"{seen:,.0f} s ago",
        )
    return table


def run_top(store: Any, *, once: bool, interval: float = 1.0) -> None:
    """Print one frame (``once``) or refresh a live view every ``interval`` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a file: room for long job ids rather than "…"
    if once:
        console.print(render_frame(job_lines(store)))
        return
    try:
        with Live(render_frame(job_lines(store)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_frame(job_lines(store)), refresh=True)
    except KeyboardInterrupt:
        return
